"""Code-level replication prototype (numpy): each key's code also stored in its second-nearest
list (query metric) when that centroid lies within (1+eps) of its own squared distance (SPANN's
rule), probing counted in stored codes (duplicates included). Probed keys scored exactly.

    python3 tools/prototype/code_replicas.py out/dumps/gemma3-devil-16k.safetensors 8
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, query_context, rerank
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,w,V=hd.clusters()
    W=V*np.sqrt(w); X=Kh@W; CX=C@W
    d=(X*X).sum(1)[:,None]-2*X@CX.T+(CX*CX).sum(1)[None]
    o=np.argsort(d,1)[:,:3]
    d1=d[np.arange(T),a]
    mem={}
    for eps in (0.0,0.1,0.2,0.4):
      lists=[[] for _ in range(k)]
      for t in range(T):
        lists[a[t]].append(t)
        for c in o[t]:
          if c!=a[t] and d[t,c]<=(1+eps)*d1[t]:
            lists[c].append(t); break
      mem[eps]=[np.array(x,dtype=int) for x in lists]
    Cq=quant(C,4)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        for eps,lists in mem.items():
          sizes=np.array([len(x) for x in lists])
          cum2=np.cumsum(sizes[lo_])
          for f in (0.16,0.2,0.3):
            n=np.searchsorted(cum2,f*vis)+1
            idx=np.unique(np.concatenate([lists[c] for c in lo_[:n]]))
            idx=idx[(idx<vis)]; idx=idx[~stat[idx]]
            rec,mass=rerank(idx,s[idx],s,e,stat,nb,top100,1.0)
            acc.setdefault((eps,f),[]).append((rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:12],'eps=%.1f scanned=%.2f R@100=%.3f mass=%.4f oracle=%.4f gap=%.4f'%(key+tuple(v.mean(0))+(v[:,2].mean()-v[:,1].mean(),)))
