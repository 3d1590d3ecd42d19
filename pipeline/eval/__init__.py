"""Evaluating: LM metrics and HellaSwag (shared with training), and the evaluate stage."""
