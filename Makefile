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

# The .deb, built from the repository root with packaging/debian copied to ./debian for the build (links
# to systemd/ dereferenced); ./debian and the build's leftovers are removed on every path, the package
# and its .buildinfo/.changes land in $(DIST)/. Debian's own tools and interpreter only: a python3 earlier in
# PATH (pyenv) has neither the build module nor the python3-* packages the .deb depends on.
DIST := dist
DEB_VERSION = $(shell dpkg-parsechangelog -l packaging/debian/changelog -S Version)
deb:
	@if [ -e debian ]; then echo "deb: ./debian exists (another build running, or left by a killed one?)" >&2; exit 1; fi
	@mkdir -p $(DIST)
	@set -e; leftovers="debian .pybuild"; for d in build oma_appliance.egg-info; do [ -e $$d ] || leftovers="$$leftovers $$d"; done; \
	trap 'rm -rf $$leftovers' EXIT; \
	cp -rL packaging/debian debian; \
	PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign; \
	for f in ../oma-appliance_$(DEB_VERSION)_all.deb ../oma-appliance_$(DEB_VERSION)_*.buildinfo \
	         ../oma-appliance_$(DEB_VERSION)_*.changes; do mv -f "$$f" $(DIST)/; done
	@ls -l $(DIST)/oma-appliance_$(DEB_VERSION)_all.deb

# Exposure of every unit as systemd-analyze security --offline=true sees it; fails when a unit is above
# its target (tests/packaging/units_check.py holds the targets). Needs only python3 and systemd-analyze.
unit-report:
	@python3 tests/packaging/units_check.py report

clean:
	rm -rf $(VENV) .run .cache build *.egg-info $(DIST) debian .pybuild
