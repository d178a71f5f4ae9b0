# Shared environment for kiln's scripts (sourced, not run).
# One build cache outside the clone, reused by every checkout and by CI: a cold build of Burn with
# the wgpu backend takes 30-40 minutes on two cores, a warm one seconds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}"
# Mesa's lavapipe warns when XDG_RUNTIME_DIR is unset.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="$(mktemp -d -t kiln-xdg.XXXXXX)"
fi
