"""Codes at equal code bytes (numpy): 4-bit key codes at probe f against 3-bit residual codes
(clipped at the 0.5th percentile) at 4f/3 and 2-bit residual codes (clipped at 1, 2 or 5) at
2f, each re-ranked at 1.25x and 1.5x the budget. A random N evaluation queries per head.

    python3 tools/prototype/equal_code_bytes.py out/dumps/gemma3-devil-16k.safetensors 8
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, qclip, query_context, probed_members, rerank
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02; LS=32
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,_,_=hd.clusters(LS)
    Cq=quant(C,4); R=Kh-Cq[a]
    cfg={'abs4':(quant(Kh,4),[0.16,0.2]),'res3c.5':(Cq[a]+qclip(R,3,0.5),[0.213,0.267]),'res2c2':(Cq[a]+qclip(R,2,2),[0.32,0.4]),'res2c1':(Cq[a]+qclip(R,2,1),[0.32]),'res2c5':(Cq[a]+qclip(R,2,5),[0.32])}
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        for name,(ap,fs) in cfg.items():
          for f in fs:
            idx=probed_members(a,lo_,cum,f,vis,stat)
            for rr in (1.25,1.5):
              rec,mass=rerank(idx,ap[idx]@q,s,e,stat,nb,top100,rr)
              acc.setdefault((name,f,rr),[]).append((rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:12],'%-8s probe=%.3f rr=%.2f R@100=%.3f mass=%.4f oracle=%.4f gap=%.4f'%(key+tuple(v.mean(0))+(v[:,2].mean()-v[:,1].mean(),)))
