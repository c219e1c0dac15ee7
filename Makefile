# The two commands of the README:
#   make demo   set up this machine, build, run a controller with three simulated devices
#   make test   set up this machine, build, run the whole test suite (what CI runs)

CARGO ?= cargo

.PHONY: test demo setup setup-tests build agent-aarch64 lint fuzz-check bench

test: setup-tests lint build agent-aarch64
	$(CARGO) test --workspace
	# The suites that touch the database again, on PostgreSQL (the executables just built).
	bash scripts/test-postgres.sh
	@[ -n "$$NIXPKGS_LIB" ] || echo "note: NIXPKGS_LIB is not set: tests/tests/modules.rs skipped evaluating the NixOS modules with lib.evalModules"
	$(MAKE) fuzz-check

demo: setup
	$(CARGO) build --workspace --bins
	bash scripts/demo.sh

setup:
	bash scripts/setup.sh

setup-tests:
	bash scripts/setup.sh --test-inputs

build:
	$(CARGO) build --workspace --bins

# The agent for aarch64, which the ARM board tests run inside the board (cached).
agent-aarch64:
	bash scripts/agent-aarch64.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Fuzz targets must keep compiling; running them is `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET`.
fuzz-check:
	CARGO_TARGET_DIR=target/fuzz-check $(CARGO) check --manifest-path fuzz/Cargo.toml --no-default-features

# Benchmarks (not part of the test command): writes docs/benchmarks.md.
bench: setup
	command -v sshd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
	$(CARGO) build --release --workspace --bins
	target/release/thymis-bench
