# The README's two commands: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xai-installed
LXT_VENV ?= .venv-lxt
LXT_PY := $(LXT_VENV)/bin/python
LXT_STAMP := $(LXT_VENV)/.lxt-installed
LXT_PACKAGES := lxt==2.1 transformers==4.53.3 huggingface_hub==0.34.4 tokenizers==0.21.4 regex tabulate

.PHONY: install demo test test-all stress bench clean lxt-oracle

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xai run recipes/quickstart.yaml

# two workers (pytest-xdist), one test module per worker; JOBS=1 runs it in one process
JOBS ?= 2
test: $(STAMP) $(LXT_STAMP)
	$(VENV)/bin/pytest -n $(JOBS) --dist loadfile

test-all: $(STAMP) $(LXT_STAMP)  # also the slow parity cases (extra exporters, vit_b_16)
	$(VENV)/bin/pytest -n $(JOBS) --dist loadfile -m ""

stress: $(STAMP)  # fuzzed images and recipes, kill-and-rerun trials; not part of `make test`
	$(PY) -m stress.run $(STRESS_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_explain.py

# LXT 2.1 as a test oracle (tests/test_lxt_parity.py), kept out of the product's environment: a bare venv
# that sees $(VENV)'s packages (torch, torchvision, zennit, timm, xai) through a .pth file, plus lxt and the
# few packages lxt.efficient imports. transformers 4.53 (lxt 2.1's bert patch needs
# find_pruneable_heads_and_indices, gone in 5.x) requires huggingface_hub < 1.0, which shadows $(VENV)'s.
$(LXT_STAMP): | $(STAMP)
	rm -rf $(LXT_VENV)
	$$($(PY) -c "import sys; print(sys._base_executable)") -m venv --without-pip $(LXT_VENV)
	$(PY) -c "import sysconfig; print(\"import site; site.addsitedir('%s')\" % sysconfig.get_paths()['purelib'])" > \
	  $$($(LXT_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/xai-main-venv.pth
	$(PY) -m pip --python $(LXT_PY) install -q --no-deps $(LXT_PACKAGES)
	$(LXT_PY) -c "import lxt.efficient, zennit, torchvision, xaicli"
	@touch $(LXT_STAMP)

lxt-oracle: $(LXT_STAMP)

clean:
	rm -rf $(VENV) $(LXT_VENV) xai-out demo-out .pytest_cache
