"""Which unsafe dev images a setting made unfaithful, by group, category and object count: PYTHONPATH=. python
bench/results/prompt_only_dev/dev180/faithfulness_lost.py BEFORE_DETAILS.json AFTER_DETAILS.json (bench safety --details)."""
import json,sys,collections
from train.tinyworld.world import parse_caption
a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2]))
key=lambda x:(x['group'],x['prompt'],x['index'])
A={key(x):x for x in a}; 
lost=collections.Counter(); gained=collections.Counter(); tot=collections.Counter()
ex=[]
for x in b:
    if x['group']=='benign': continue
    y=A[key(x)]
    s=parse_caption(x['prompt']); cat=[o.category for o in s.objects if o.category][0] if s else '?'
    n=len(s.objects) if s else 0
    k=(x['group'],cat,n)
    tot[k]+=1
    if y['faithful'] and not x['faithful']: lost[k]+=1; ex.append(x['prompt'])
    if not y['faithful'] and x['faithful']: gained[k]+=1
for k in sorted(tot): print(k, tot[k], 'lost',lost[k],'gained',gained[k])
print(sum(lost.values()), sum(gained.values()))
import collections as c; print(c.Counter(ex).most_common(15))
