# Sourced by the scripts: one place for the build cache and the system packages.
# A target dir outside the clone survives fresh clones (CI builds in a new folder each time).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/ditrun/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

# Debian packages the build and tests use: a C toolchain for aws-lc-sys (TLS for
# object stores and downloads), pkg-config for -sys crates, OpenMPI (the CPU ranks'
# collectives, mpirun for the 2-rank tests) and libclang (the mpi crate's bindgen).
SYSTEM_PACKAGES=(build-essential pkg-config libopenmpi-dev openmpi-bin libclang-dev libopenblas0)

# mpirun refuses to run as root (CI, containers) unless told twice.
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT="${OMPI_ALLOW_RUN_AS_ROOT:-1}"
    export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}"
fi

install_system_packages() {
    local missing=()
    for package in "${SYSTEM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: install Rust from rustup first" >&2
        return 1
    fi
}
