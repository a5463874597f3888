# Shared by the simulator examples' setup.sh (sourced, not run): the simulator's virtualenv
# and headless rendering with Mesa's EGL.
#
#   sim_venv VENV PYTHON REQUIREMENT...   makes VENV with PYTHON and installs the requirements,
#                                         unless VENV's stamp already lists exactly them
#   headless_rendering CHECK              runs the function CHECK (a render in the simulator's
#                                         venv); when it fails, installs the missing Debian
#                                         packages of Mesa's EGL (software llvmpipe driver) and
#                                         libGL, and runs CHECK again
# Both are idempotent and quick when done; every failure exits non-zero with its reason.

# Mesa's EGL with its software (llvmpipe) driver, and libGL for PyOpenGL.
GL_PACKAGES=(libegl1 libegl-mesa0 libgl1 libglx-mesa0 libgl1-mesa-dri)

sim_venv() {
  local venv="$1" python="$2"
  shift 2
  local stamp="$venv/.keras-openpi-requirements"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$*" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$@"
    echo "$*" > "$stamp"
  fi
}

headless_rendering() {
  local check="$1" missing=() package SUDO=""
  "$check" 2>/dev/null && return 0
  for package in "${GL_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null || {
        echo "setup.sh: headless rendering needs the Debian packages ${missing[*]}:" \
          "install them as root (apt-get install ${missing[*]})." >&2
        exit 1
      }
      SUDO="sudo"
    fi
    echo "setup.sh: installing ${missing[*]}"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
  "$check" || {
    echo "setup.sh: MuJoCo cannot render with MUJOCO_GL=egl (see the error above)." >&2
    exit 1
  }
}
