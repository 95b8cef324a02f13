"""Spread-aware routing prototype (numpy): lists ranked by `q·c + beta·sqrt(Σ_d q_d² var_ld)`,
the centroid score plus beta standard deviations of the list's member scores under a per-list
diagonal variance of the residuals (4-bit codes, as many bytes as the centroids), against the
centroid score alone. Probed keys scored exactly. A random N evaluation queries per head.

    python3 tools/prototype/spread_routing.py out/dumps/gemma3-devil-16k.safetensors 24
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, probe_exactly, report, quant, query_context
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02
acc={}
for hd in dump_heads(path,nq,7):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,w,V=hd.clusters()
    Cq=quant(C,4); R=Kh-Cq[a]
    cnt=np.maximum(np.bincount(a,minlength=k),1).astype(float)
    diag=np.zeros((k,D)); np.add.at(diag,a,R**2); diag/=cnt[:,None]
    dq=quant(diag,4)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        open_=~stat; aa=a[:vis]
        cs=Cq@q
        routes={'centroid':cs}
        sdd=np.sqrt(np.maximum(dq@(q*q),0))
        for b in (1.0,1.5,2.0,3.0): routes[f'diag{b}']=cs+b*sdd
        probe_exactly(acc,routes,(0.12,0.16,0.2,0.3),aa,open_,vis,s,e,stat,nb,top100,ormass)
report(acc,path)
