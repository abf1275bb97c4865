#!/usr/bin/env bash
# compare_cli.sh REPO OUT: run a fixed set of CLI commands (help texts, listings, explain, export, eval, error
# lines) with the code of checkout REPO and record stdout, stderr, exit codes and the hashes of the files
# written (timings masked). Two such folders from two checkouts compare with `diff -r OLD NEW`.
REPO=$1; OUT=$2; rm -rf "$OUT"; mkdir -p "$OUT"; W=$(mktemp -d)
PY=${PYTHON:-python}
cp -r $REPO/onnx_excite/data/samples $W/samples; cp -r $REPO/tests/data/voc_sample $W/voc
printf 'not an image' > $W/samples_bad.jpg
i=0
run() { i=$((i+1)); ( cd $W && COLUMNS=120 PYTHONPATH=$REPO $PY -c "import sys; sys.argv[0]='onnx-excite'; from onnx_excite.cli.app import main; main()" "$@" ) > $OUT/$i.out 2> $OUT/$i.err; echo "$? :: $*" >> $OUT/index; }
run --help
for c in layers check export bench bench-device explain demo methods models classes eval ground; do run $c --help; done
run eval pointing --help; run eval localization --help
run methods; run methods --detail; run layers default; run check default; run classes --grep dog
run explain default samples/dog.jpg -o o1 --top 2
run explain default samples/dog.jpg samples_bad.jpg -o o2 -m grad -m mwp
run explain nosuch.onnx samples/dog.jpg -o o3
run explain default samples/dog.jpg -l nope -o o4
run export default -o exp.onnx
run export default -o exp_top1.onnx --signal top1
run eval pointing --data voc --methods cmwp,mwp,center -o ev1
run eval localization --data voc --methods cmwp -o ev2
( cd $W && find o1 o2 exp.onnx exp_top1.onnx ev1 ev2 -type f 2>/dev/null | sort | while read f; do case $f in *.json|*.jsonl|*.md|*.csv) sed -E "s/\"seconds\": [0-9.e-]+/\"seconds\": T/g" "$f" | sha256sum | sed "s|-|$f|";; *) sha256sum "$f";; esac; done ) > $OUT/files.sha
rm -rf $W
sed -i -E "s/in [0-9.]+ s/in T s/g; s/[0-9.]+ images?\/s/T images\/s/g" $OUT/*.out $OUT/*.err
