"""Attention-aware reassignment prototype (numpy): every key that train queries attend (their
exact top 2%) moves, among its 8 nearest lists, to the one those queries rank best (z-scored
centroid score weighted by attention); centroids recomputed. Evaluated on the evaluation
queries with exact scoring of the probed keys. Args: dump, queries per head, iterations.

    python3 tools/prototype/attention_assignment.py out/dumps/gemma3-devil-16k.safetensors 8 1
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, load, quant, query_context, probed_members, rerank
path=sys.argv[1]; nq=int(sys.argv[2]); iters=int(sys.argv[3]) if len(sys.argv)>3 else 1
tpos=load(path)['train_positions']
budget=0.02
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    Tp=np.tile(tpos,hd.g)
    k,a,C,_,_=hd.clusters()
    variants={'kmeans':(a,C)}
    a2=a.copy(); C2=C.copy()
    for it in range(iters):
      # votes[key] accumulates, per list, the attention weight of train queries ranking that list
      Cq=quant(C2,4)
      best=np.full(T,-np.inf); choice=a2.copy()
      score=np.zeros((T,)) 
      # per key: weighted sum over attending train queries of the list's rank score (z-scored centroid score)
      acc_w=np.zeros(T); votes={}
      for i in range(0,len(Qtr),64):
        Qb=Qtr[i:i+64]; Pb=Tp[i:i+64]
        S=Qb@Kh.T  # [b,T]
        CS=Qb@Cq.T  # [b,k]
        CSz=(CS-CS.mean(1,keepdims=True))/CS.std(1,keepdims=True)
        for j in range(len(Qb)):
          p=int(Pb[j]); vis=p+1
          if vis<512: continue
          s=S[j,:vis].copy(); s[:4]=-np.inf; s[max(0,vis-64):]=-np.inf
          nb=int(np.ceil(budget*vis)); top=np.argpartition(-s,nb)[:nb]
          z=hd.scale*s[top]; w=np.exp(z-z.max()); w/=w.sum()
          for t,wt in zip(top,w):
            votes.setdefault(t,np.zeros(k))
            votes[t]+=wt*CSz[j]
            acc_w[t]+=wt
      for t,v in votes.items():
        # the list with the best attention-weighted ranking score, among the key's 8 nearest in key space
        d=((C2-Kh[t])**2).sum(1); near=np.argsort(d)[:8]
        choice[t]=near[np.argmax(v[near])]
      a2=choice
      C2=np.zeros((k,D)); np.add.at(C2,a2,Kh); C2/=np.maximum(np.bincount(a2,minlength=k),1)[:,None]
      variants[f'attn{it+1}']=(a2.copy(),C2.copy())
    queries=list(hd.queries())
    for name,(aa,CC) in variants.items():
      Cq=quant(CC,4)
      for hq,qi,q,p in queries:
          vis=p+1
          s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,aa,Cq,k,budget)
          for f in (0.1,0.16,0.2,0.3):
            idx=probed_members(aa,lo_,cum,f,vis,stat)
            rec,mass=rerank(idx,s[idx],s,e,stat,nb,top100,1.0)
            acc.setdefault((name,f,l),[]).append((rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:12],'%-7s probe=%.2f layer %d R@100=%.3f mass=%.4f oracle=%.4f gap=%.4f'%(key+tuple(v.mean(0))+(v[:,2].mean()-v[:,1].mean(),)))
