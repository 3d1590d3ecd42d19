"""DVC stage `tokenize`: the same command as `gptpipe tokenize` (see `--help`)."""

if __name__ == "__main__":
    from pipeline.cli import run_stage

    run_stage("tokenize")
else:
    # Running any script in stages/ puts this folder first on sys.path, so the standard library's `tokenize`
    # (which inspect and linecache import) would resolve to this file: hand the importer the real module.
    import importlib.util
    import sys
    import sysconfig

    _spec = importlib.util.spec_from_file_location("tokenize", f"{sysconfig.get_paths()['stdlib']}/tokenize.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["tokenize"] = _module
    _spec.loader.exec_module(_module)
