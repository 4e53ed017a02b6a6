#!/bin/bash
# usage: run_one.sh NAME PORT "EXTRA serve.py args" -- server command...
set -u
NAME=$1; PORT=$2; EXTRA=$3; shift 4
L=/tmp/peerlogs; R=/work/main/benchmarks/results
if ss -ltn | grep -q ":$PORT "; then echo "port $PORT busy"; exit 3; fi
echo "[$(date -u +%T)] starting $NAME: $*"
setsid "$@" > $L/server_$NAME.log 2>&1 &
SPID=$!
echo $SPID > $L/server_$NAME.pid
T0=$(date +%s)
until curl -sf http://127.0.0.1:$PORT/v1/models > $L/models_$NAME.json; do
  sleep 2
  if ! kill -0 $SPID 2>/dev/null; then echo "server died"; tail -30 $L/server_$NAME.log; exit 4; fi
  if (( $(date +%s) - T0 > 600 )); then echo "not ready in 600 s"; kill -TERM -- -$SPID; exit 5; fi
done
echo "[$(date -u +%T)] ready after $(( $(date +%s) - T0 )) s: $(cat $L/models_$NAME.json)"
rm -f $L/stop_$NAME
python3 $L/rss_sampler.py $SPID $L/stop_$NAME $L/rss_$NAME.json > $L/rss_$NAME.out &
SAMP=$!
python3 $L/cpu_sampler.py $SPID 1200 > $L/cpu_$NAME.txt &
CPUS=$!
sleep 2
cd /work/main
CMD=".venv/bin/python benchmarks/serve.py --base-url http://127.0.0.1:$PORT/v1 --model ${MODEL:-smollm2} --tokenizer /tmp/smollm2-hf --endpoint completions --num-prompts ${NP:-96} --input-len 128 --output-len 64 --max-concurrency 32 --seed 0 --label $NAME --result-json benchmarks/results/serve_$NAME${SUF:-}.json --plot benchmarks/results/serve_$NAME${SUF:-}.png --no-progress $EXTRA"
echo "$CMD" > $L/cmd_$NAME.txt
echo "[$(date -u +%T)] $CMD"
$CMD > $L/bench_$NAME.out 2>&1
echo "bench rc=$?"
touch $L/stop_$NAME; wait $SAMP; kill $CPUS
cat $L/bench_$NAME.out | tail -45
echo "peak: $(cat $L/rss_$NAME.out)"
kill -TERM -- -$SPID
for i in $(seq 60); do kill -0 $SPID 2>/dev/null || break; sleep 1; done
kill -0 $SPID 2>/dev/null && { echo "still alive, KILL"; kill -KILL -- -$SPID; sleep 2; }
pgrep -g $SPID >/dev/null && echo "group members left: $(pgrep -g $SPID)"
ss -ltn | grep -q ":$PORT " && echo "PORT $PORT STILL BUSY" || echo "port $PORT free"
echo "[$(date -u +%T)] done $NAME"
