#!/usr/bin/env bash
# Wheels, for Python 3.12 on x86-64 Linux, of what a bare CUDA machine may lack to run bench/gpu_suite.sh
# offline (the versions this repository is tested with); run here, where pip reaches the registry, then carry
# .whl/ to the GPU machine, where the suite installs it (--no-index --no-deps, into /tmp/psilora-site).
#   bash bench/gpu_wheels.sh            # -> .whl/
# transformers and torch are left to the machine (the lent CUDA image has them; with the wheels and this
# repository the carried tree stays under the device tool's 64 MiB: bitsandbytes alone is 41 MiB).
# DeepSpeed ships a source distribution only: its wheel is built here against this environment's torch
# (pure Python; its ops are JIT-built on the GPU machine when used).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for n in 2_28 2_27 2_24 2_17 2014 1; do
  case $n in 2014|1) platforms+=(--platform "manylinux${n}_x86_64");; *) platforms+=(--platform "manylinux_${n}_x86_64");; esac
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl bitsandbytes==0.50.2 datasets==5.2.0 hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -sh .whl
ls .whl
