# The two commands of the README, and the pieces they are made of.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test deb unit-report clean

$(STAMP): scripts/setup pyproject.toml
	./scripts/setup
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m oma_common.devrun --state-dir ./.run

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .run .cache build *.egg-info
