#!/usr/bin/env bash
# Issue 11, item 5: today's numbers with the current method and default config, on development data only.
# One run at a time (two threads each: a second heavy process on this machine slows both many times over).
# A run whose directory already holds summary.json is kept, so the script resumes after an interruption.
#   bash benchmarks/todays_numbers.sh [OUT]        (default OUT: results/today_0.8; results/today_0.5 holds the
#   lemoe 0.5/0.6 default's runs, results/today_0.7 the baselines at T=100; about 3 h on 2 cores without chat rows,
#   about 3 times that with them)
set -euo pipefail
out="${1:-results/today_0.8}"
data="${LEMOE_DATA:-../shared/data}"
mkdir -p "$out"

run() {  # NAME, then lemoe bench arguments
  local name="$1"; shift
  if [[ -f "$out/$name/summary.json" || -f "$out/$name/comparison.json" ]]; then
    echo "kept: $out/$name"; return
  fi
  echo "$(date -u +%FT%TZ) start: $name"
  lemoe bench --threads 2 "$@" --out "$out/$name"
  echo "$(date -u +%FT%TZ) done: $name"
}

run counterfact_rome_dev_all --data "$data/counterfact/counterfact_rome_format_dev.json" --T 223
if [[ ! -f "$out/demo.txt" ]]; then
  lemoe demo --threads 2 > "$out/demo.txt"
fi
run zsre_mend_T1000 --data "$data/zsre/zsre_mend_dev.json" --T 1000
run knowedit_zsre_T1000 --data "$data/zsre/knowedit_zsre_test.json" --T 1000
run baselines_counterfact_rome_T100 --data "$data/counterfact/counterfact_rome_format_dev.json" --T 100 \
  --method lemoe,ft-l,memoe,grace,wise --method-config benchmarks/baseline_configs.json
run wikidata_cf_T1000 --data "$data/knowedit/knowedit_wiki_counterfact_train.json" --T 1000
run counterfact_easyedit_T1000 --data "$data/counterfact/counterfact_easyedit_train.json" --T 1000
