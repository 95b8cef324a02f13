"""Least-squares routing vectors prototype (numpy): per list, a vector r fitted by ridge
regression to the train queries so that q·r predicts the list's best member score (lsq-max) or
its members' log-sum-exp over the softmax scale (lsq-lse); "+c" fits the correction to the
centroid score instead. Lists ranked by q·r (4-bit codes, as many bytes as the centroids) on
the evaluation queries, probed keys scored exactly. A random N evaluation queries per head.

    python3 tools/prototype/lsq_routing.py out/dumps/gemma3-devil-16k.safetensors 16
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, query_context, rerank, probe_by, report
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02
acc={}
for hd in dump_heads(path,nq,7):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,w,V=hd.clusters()
    Cq=quant(C,4)
    # per train query, per list: max member score and log-sum-exp of member logits
    S=Qtr@Kh.T  # [nq_train, T]
    order=np.argsort(a,kind='stable'); bounds=np.searchsorted(a[order],np.arange(k+1))
    Ss=S[:,order]
    M=np.full((len(Qtr),k),-1e9); LSE=np.full((len(Qtr),k),-1e9)
    for j in range(k):
      seg=Ss[:,bounds[j]:bounds[j+1]]
      if seg.shape[1]==0: continue
      M[:,j]=seg.max(1)
      z=hd.scale*seg; mz=z.max(1,keepdims=True); LSE[:,j]=(mz[:,0]+np.log(np.exp(z-mz).sum(1)))/hd.scale
    G=Qtr.T@Qtr; lam=1e-3*np.trace(G)/D
    Ainv=np.linalg.solve(G+lam*np.eye(D),Qtr.T)   # [D, ntrain]
    variants={}
    for name,target in (('lsq-max',M),('lsq-lse',LSE)):
      R=(Ainv@target).T   # [k, D]
      variants[name]=quant(R,4)
      # residual fit on top of centroid: q.c + q.u
      U=(Ainv@(target-Qtr@C.T)).T
      variants[name+'+c']=quant(C+U,4)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        open_=~stat; aa=a[:vis]
        routes={'centroid':Cq@q}
        for name,Rq in variants.items(): routes[name]=Rq@q
        for name,sc in routes.items():
          for f in (0.1,0.16,0.2):
            idx=probe_by(sc,aa,open_,f,vis)
            rec,mass=rerank(idx,s[idx],s,e,stat,nb,top100,1.0)
            acc.setdefault((name,f),[]).append((rec,mass,ormass))
report(acc,path)
