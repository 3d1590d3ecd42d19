"""What every params section shares: the strict base model, collected cross-field problems, bounds, the train.* markers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Upper bounds: a size or seed beyond what the code can hold is a clear error here, not an overflow or a hang later.
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds, with room for seed + rank
BIG = 10**12  # counts of steps, characters, items


class Section(BaseModel):
    """Base for every params section: unknown keys are errors at every depth, values are coerced."""

    # Lax mode coerces the strings `dvc exp run -S` writes ("3e-05", "4096", "true") to the field's type, and the
    # numbers it writes for names (`-S train.run_name=123` gives 123) to text; inf and nan are never a sensible setting.
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True, allow_inf_nan=False,
                              coerce_numbers_to_str=True)


class Problems(ValueError):
    """Cross-field problems found by a model validator: (key relative to the model, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


def check(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise Problems(problems)


# Marks a train.* key that says how long to train, how often to look or where things go, not what is learned:
# changing it keeps the run (its checkpoints resume). Every other train.* key is part of the run's identity.
KEEPS_RUN = {"keeps_run": True}
# Marks a train.* interval that says how often something happens along the run (a log line, an evaluation, a
# checkpoint): `gptpipe plan`'s probe switches each off to time the steps alone. Each also keeps the run.
CADENCE = {**KEEPS_RUN, "cadence": True}
