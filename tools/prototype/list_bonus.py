"""Routing prototype (numpy): the centroid score plus a per-list bonus learned from train
queries (mean over them of max_{k in list} q.k - q.c), weight beta; recall@100 and covered mass
at several probe fractions. A random N evaluation queries per head (default 24).

    python3 tools/prototype/list_bonus.py ../shared/data/gemma3-jargon-16k.safetensors 16
"""
import sys, json, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, probed_members, rerank
path=sys.argv[1]; nq=int(sys.argv[2]) if len(sys.argv)>2 else 24
budget=0.02; LS=32
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    codes=quant(Kh,4); k,a,C,_,_=hd.clusters(LS)
    # per-list bonus from train queries: mean over q of (max_{k in l} q.k - q.c_l), and top-quantile
    sub=Qtr[hd.rng.choice(len(Qtr),min(512,len(Qtr)),replace=False)]
    S=sub@Kh.T  # nq x T
    Cs=sub@C.T  # nq x k
    bonus=np.zeros(k); bonus90=np.zeros(k)
    for j in range(k):
        m=a==j
        if not m.any(): continue
        mx=S[:,m].max(1)-Cs[:,j]
        bonus[j]=mx.mean()
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s=Kh[:vis]@q; z=hd.scale*s; z-=z.max(); e=np.exp(z); e/=e.sum()
        stat=np.zeros(vis,bool); stat[:4]=True; stat[max(0,vis-64):]=True
        nb=int(np.ceil(budget*vis))
        s2=np.where(stat,-np.inf,s); order=np.argsort(-s2); top100=set(order[:100]); ormass=e[stat].sum()+e[order[:nb]].sum()
        sizes=np.bincount(a[:vis],minlength=k)
        for beta in (0,0.5,1.0,1.5):
          ls=C@q+beta*bonus
          lo_=np.argsort(-ls); cum=np.cumsum(sizes[lo_])
          for f in (0.08,0.12,0.2,0.3):
            idx=probed_members(a,lo_,cum,f,vis,stat)
            rec,mass=rerank(idx,codes[idx]@q,s,e,stat,nb,top100)
            acc.setdefault((beta,f),[]).append((rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:8],'beta=%.1f probe=%.2f R@100=%.3f mass=%.4f oracle=%.4f'%(key+tuple(v.mean(0))))
