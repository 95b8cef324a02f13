"""Code prototype (numpy): codes of each key's residual from its list's (4-bit decoded)
centroid, against codes of the key itself. Per-channel uniform quantisers over the whole head,
their range the channel's min and max (abs4, abs3, res3, res4) or clipped at the p-th and
(100-p)-th percentiles (r3c5 and r2c5: p = 0.5, r3c2 and r2c2: 2; a3c1 and a4c1: 0.1 of the raw
keys). Recall@100 and covered mass at probes 0.14, 0.2 and 0.3 (query-metric lists of
32 keys, 1.5x re-rank). A random N evaluation queries per head (default 24).

    python3 tools/prototype/residual_codes.py ../shared/data/gemma3-jargon-16k.safetensors 12
"""
import sys, json, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, qclip, query_context, probed_members, rerank
path=sys.argv[1]; nq=int(sys.argv[2]) if len(sys.argv)>2 else 24
budget=0.02; LS=32
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,_,_=hd.clusters(LS)
    Cq=quant(C,4)
    R=Kh-Cq[a]
    approx={'r2c2':Cq[a]+qclip(R,2,2),'r2c5':Cq[a]+qclip(R,2,0.5),'r3c2':Cq[a]+qclip(R,3,2),'r3c5':Cq[a]+qclip(R,3,0.5),'a3c1':qclip(Kh,3,0.1),'a4c1':qclip(Kh,4,0.1),
      'abs4':quant(Kh,4),'abs3':quant(Kh,3),'res3':Cq[a]+quant(R,3),'res4':Cq[a]+quant(R,4)}
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        for f in (0.14,0.2,0.3):
          idx=probed_members(a,lo_,cum,f,vis,stat)
          for name,ap in approx.items():
            rec,mass=rerank(idx,ap[idx]@q,s,e,stat,nb,top100)
            acc.setdefault((f,name),[]).append((rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:8],'probe=%.2f %-5s R@100=%.3f mass=%.4f oracle=%.4f'%(key+tuple(v.mean(0))))
