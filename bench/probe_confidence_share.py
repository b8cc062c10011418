"""Issue 26, item 3, a negative probe: does a per-key share of low-confidence answers (distinct images; confidence
below the 5% quantile of the victim's confidence on its training images; one-sided binomial test against a null of
10%, alpha 1e-4, last 1,000 distinct queries, from 50 on) separate Jacobian augmentation from benign keys? On digits
seed 0 it does not (see the README's second-pass section). Not a detector of the package.

    PYTHONPATH=src:bench nice -n 10 python bench/probe_confidence_share.py 0
"""
import hashlib
import sys

import torch
from measure_model_stealing import victim_model, steal, labels, benign_keys
from safedl import registry
from safedl.data import load_builtin, stratified_split
from safedl.defenses.query.ood_share import binomial_tail
from safedl.utils.progress import set_enabled
set_enabled(False); torch.set_num_threads(1)
seed = int(sys.argv[1])
sp = stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=seed)
victim = victim_model(sp, seed)
def conf(x):
    with torch.no_grad(): return victim(x).softmax(1).max(1).values
thr = float(torch.quantile(conf(sp.train.x), 0.05))
print("thr", thr)
def first_flag(stream, null=0.10, alpha=1e-4, window=1000):
    seen = set()
    c = conf(stream)
    q = []
    for i in range(len(stream)):
        h = hashlib.sha1(stream[i].numpy().tobytes()).hexdigest()
        if h in seen: continue
        seen.add(h); q.append(bool(c[i] < thr)); q = q[-window:]
        n, k = len(q), sum(q)
        if n >= 50 and float(binomial_tail(torch.tensor([k]), torch.tensor([n]), null)[0]) < alpha:
            return i + 1
    return None
ben = benign_keys(torch.cat([sp.test.x, sp.val.x]), torch.cat([sp.test.y, sp.val.y]), 4, seed)
fl = {k: first_flag(v) for k, v in ben.items()}
print("benign flagged", sum(v is not None for v in fl.values()), "/", len(fl), {k: v for k, v in fl.items() if v})
for name, attack in (("jacobian", registry.create("extraction", "jacobian_augmentation", epochs=10, seed=seed)),
                     ("copycat_in", registry.create("extraction", "copycat", pool="train", epochs=10, seed=seed))):
    _, lg = steal(victim, attack, sp.train.x, 1000)
    c = conf(lg.x)
    print(name, "low-conf share", float((c < thr).float().mean()), "first flag", first_flag(lg.x))
