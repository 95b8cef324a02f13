"""Routing headroom prototype (numpy): how much covered mass the list order loses. Lists
(query-metric k-means, 32 keys) are ranked by their centroid score, by the true best member
score (oracle-max), by the true attention mass (oracle-mass), or by the centroid score plus 1 or
2 standard deviations of a rank-1-plus-isotropic model of the list's spread; the probed keys are
then scored exactly (no code error), so the gap to the oracle is the routing's alone. A random
N evaluation queries per head.

    python3 tools/prototype/routing_headroom.py out/dumps/gemma3-devil-16k.safetensors 8
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, probe_exactly, report, quant, query_context
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,w,V=hd.clusters()
    Cq=quant(C,4)
    # per-list top principal direction of residuals and stds
    R=Kh-C[a]
    U=np.zeros((k,D)); s1=np.zeros(k); sr=np.zeros(k)
    for j in range(k):
      m=R[a==j]
      if len(m)<2: continue
      _,sv,vt=np.linalg.svd(m,full_matrices=False)
      U[j]=vt[0]; s1[j]=sv[0]/np.sqrt(len(m)); sr[j]=np.sqrt(max((sv[1:]**2).sum(),0)/len(m)/(D-1))
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        open_=~stat
        sv_=np.where(stat,-np.inf,s)
        aa=a[:vis]
        mx=np.full(k,-np.inf); np.maximum.at(mx,aa[open_],s[:vis][open_])
        ms=np.zeros(k); np.add.at(ms,aa[open_],e[:vis][open_])
        cs=Cq@q; uq=U@q; qn=q@q
        spread=np.sqrt(s1**2*uq**2+sr**2*(qn-uq**2))
        routes={'centroid':cs,'oracle-max':mx,'oracle-mass':ms,'cent+1sd':cs+1.0*spread,'cent+2sd':cs+2.0*spread}
        probe_exactly(acc,routes,(0.1,0.16,0.3),aa,open_,vis,s,e,stat,nb,top100,ormass)
report(acc,path)
