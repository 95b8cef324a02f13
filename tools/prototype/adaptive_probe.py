"""Adaptive probe prototype (numpy): each query probes lists best-centroid-first until their
estimated share of the attention mass (list size times exp of the scaled centroid score,
normalised over all lists) reaches tau, within [fmin, fmax] of the visible keys, against a fixed
probe at the same mean scanned fraction. Probed keys scored exactly. A random N evaluation
queries per head.

    python3 tools/prototype/adaptive_probe.py out/dumps/gemma3-devil-16k.safetensors 16
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, query_context, rerank
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02
acc={}
for hd in dump_heads(path,nq,7):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,w,V=hd.clusters()
    Cq=quant(C,4)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        open_=~stat; aa=a[:vis]
        sizes=np.bincount(aa[open_],minlength=k)
        cs=Cq@q; o=np.argsort(-cs); c2=np.cumsum(sizes[o])
        z=hd.scale*(cs[o]-cs[o].max()); wsh=sizes[o]*np.exp(z); wsh=np.cumsum(wsh)/wsh.sum()
        def run(name,n):
            idx=np.nonzero(np.isin(aa,o[:n])&open_)[0]
            rec,mass=rerank(idx,s[idx],s,e,stat,nb,top100,1.0)
            acc.setdefault(name,[]).append((rec,mass,ormass,c2[n-1]/vis))
        for f in (0.16,0.2,0.24):
            run(f'fixed{f}',np.searchsorted(c2,f*vis)+1)
        for tau in (0.5,0.7,0.8,0.9,0.95):
          for fmin,fmax in ((0.05,0.5),(0.1,0.4)):
            n=np.searchsorted(wsh,tau)+1
            nmin=np.searchsorted(c2,fmin*vis)+1; nmax=np.searchsorted(c2,fmax*vis)+1
            run(f'tau{tau}[{fmin},{fmax}]',int(np.clip(n,nmin,nmax)))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:12],'%-18s scanned=%.3f R@100=%.3f mass=%.4f oracle=%.4f gap=%.4f'%(key,v[:,3].mean(),*v[:,:3].mean(0),v[:,2].mean()-v[:,1].mean()))
