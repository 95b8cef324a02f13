"""List representatives prototype (numpy): each list also keeps one or two member keys (the
most attended by the train queries, or the farthest from the centroid under the query
metric) as 4-bit codes; lists ranked by max(centroid, representatives) or their mean. Probed
keys scored exactly. A random N evaluation queries per head.

    python3 tools/prototype/list_representatives.py out/dumps/gemma3-devil-16k.safetensors 8
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, probe_exactly, report, load, quant, query_context
path=sys.argv[1]; nq=int(sys.argv[2])
tpos=load(path)['train_positions']
budget=0.02
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    Tp=np.tile(tpos,hd.g)
    k,a,C,w,V=hd.clusters()
    Cq=quant(C,4)
    # attention received by each key from train queries (softmax over visible non-static)
    att=np.zeros(T)
    for i in range(0,len(Qtr),256):
      S=Qtr[i:i+256]@Kh.T*hd.scale
      for j in range(S.shape[0]):
        p=int(Tp[i+j]); vis=p+1
        if vis<256: continue
        z=S[j,:vis].copy(); z[:4]=-np.inf; z[max(0,vis-64):]=-np.inf
        e=np.exp(z-z.max()); e/=e.sum(); att[:vis]+=e
    # metric-space extremeness: |W^T (k-c)|
    W=V*np.sqrt(w); ext=(((Kh-C[a])@W)**2).sum(1)
    reps={}
    for name,crit in (('att',att),('ext',ext)):
      R1=np.zeros((k,D)); R2=np.zeros((k,D))
      for j in range(k):
        m=np.nonzero(a==j)[0]
        if len(m)==0: R1[j]=R2[j]=C[j]; continue
        o=m[np.argsort(-crit[m])]
        R1[j]=Kh[o[0]]; R2[j]=Kh[o[1]] if len(o)>1 else Kh[o[0]]
      reps[name]=(quant(R1,4),quant(R2,4))
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        open_=~stat; aa=a[:vis]
        cs=Cq@q
        routes={'centroid':cs}
        for name,(R1,R2) in reps.items():
          r1=R1@q; r2=R2@q
          routes[name+'1max']=np.maximum(cs,r1); routes[name+'2max']=np.maximum(np.maximum(cs,r1),r2)
          routes[name+'1avg']=0.5*(cs+r1)
        probe_exactly(acc,routes,(0.1,0.16,0.2),aa,open_,vis,s,e,stat,nb,top100,ormass)
report(acc,path)
