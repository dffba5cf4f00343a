# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo ui test bench clean

# Let Python cache bytecode. Some environments (this machine's among them) set PYTHONDONTWRITEBYTECODE=1: every
# process -- each worker, `mlflow server`, CLI call and test process -- would then compile whatever is not cached yet
# (this project's modules, a package installed by hand) again on every import.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# --no-compile, then compileall on every core: pip byte-compiles torch's thousands of files one at a time.
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[test]'
	# Compiled once here, not on first import: otherwise the first processes of a run (two pytest workers, the
	# `study run` workers and servers they start) each compile the same torch and MLflow modules at the same time.
	# quiet=2: files this Python cannot compile (torch's Python 3.12 test helpers) are skipped, as pip skips them.
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path('purelib'), quiet=2, workers=0)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) cli.py study run

# The MLflow UI on the demo's runs: prints the link to the study's runs table once the UI answers.
ui: $(STAMP)
	$(PY) cli.py ui

test: $(STAMP)
	$(PY) -m ruff check .
	# Two worker processes, one test module each at a time (module fixtures run once): the suite is mostly single
	# threaded worker processes and servers, so a second core cuts its wall time (README, Development).
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	# The demo's stores (their write-ahead logs and the lock files workers take beside them), caches and runs.
	rm -rf $(VENV) .distillstudy distillstudy.db distillstudy.db-wal distillstudy.db-shm distillstudy.db.*.lock \
		mlflow.db mlflow.db-wal mlflow.db-shm mlflow.db.*.lock mlruns
