# Sourced by scripts/test.sh and scripts/demo.sh (not run): puts cargo and the CRIU that
# scripts/setup.sh built on PATH, or stops with one error line. Expects a `die` function.

if ! command -v cargo >/dev/null 2>&1; then
  # rustup installs put cargo here without touching PATH for non-login shells.
  if [ -f "${CARGO_HOME:-$HOME/.cargo}/env" ]; then
    # shellcheck disable=SC1091
    . "${CARGO_HOME:-$HOME/.cargo}/env"
  fi
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found (install rustup, or put cargo on PATH)"
# The patched CRIU lives in /usr/local/sbin: runc (which execs `criu`) and the tests must find it
# before any distribution criu.
case ":$PATH:" in *:/usr/local/sbin:*) ;; *) export PATH="/usr/local/sbin:$PATH" ;; esac
cargo --version
rustc --version
printf 'runc: %s\ncriu: %s\ncontainerd: %s\n' "$(runc --version | head -n1)" \
  "$(criu --version | head -n1)" "$(containerd --version)"
