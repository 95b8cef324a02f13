"""Code pipeline prototype (numpy): query-metric clusters, probe a fraction of keys, score
4-bit (or 3-bit) per-channel codes, keep rerank x budget candidates, re-rank exactly; recall@100
and covered mass against the oracle. A random 32 evaluation queries per head.

    python3 tools/prototype/codes.py ../shared/data/gemma3-jargon-16k.safetensors maha
"""
from routing import *
import itertools
def pipeline(path, fs=(0.1,0.15,0.2), rs=(1,1.5,2), bits=(3,4), nq=32, LS=32, budget=0.02, mode='maha'):
    d=load(path); md=d['__metadata__']; scales=json.loads(md['softmax_scale'])
    K=d['keys'].astype(np.float32); Qe=d['queries'].astype(np.float32); Qt=d['train_queries'].astype(np.float32)
    qpos=d['query_positions']; L,kvh,T,D=K.shape; qh=Qe.shape[1]; g=qh//kvh
    rng=np.random.default_rng(1)
    acc={}
    for l in range(L):
        for h in range(kvh):
            Kh=K[l,h]; k=T//LS
            Qtr=Qt[l,h*g:(h+1)*g].reshape(-1,D)
            a,C,_,_=head_clusters(Kh,Qtr,k,metric=mode!='plain')
            codes={}
            for b in bits:
                lo=Kh.min(0); st=(Kh.max(0)-lo)/(2**b-1); st[st==0]=1
                codes[b]=np.clip(np.round((Kh-lo)/st),0,2**b-1)*st+lo
            sel=rng.choice(Qe.shape[2],nq,replace=False)
            for hq in range(h*g,(h+1)*g):
                for qi in sel:
                    q=Qe[l,hq,qi]; p=qpos[qi]; vis=p+1
                    s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,scales[l],a,C,k,budget)
                    for f in fs:
                        n=np.searchsorted(cum,f*vis)+1
                        probed=np.isin(a[:vis],lo_[:n]) & ~stat
                        idx=np.nonzero(probed)[0]
                        for b in bits:
                            cs=codes[b][idx]@q
                            for r in rs:
                                c=idx[np.argsort(-cs)[:int(np.ceil(r*nb))]]
                                best=c[np.argsort(-s[c])[:nb]]
                                rec=len(top100.intersection(best))/100
                                mass=e[stat].sum()+e[best].sum()
                                acc.setdefault((f,b,r),[]).append((rec,mass,ormass))
    for key,v in sorted(acc.items()):
        v=np.array(v); print(path.split('/')[-1][:6],mode,'probe=%.2f bits=%d rr=%.1f  R@100=%.3f mass=%.4f oracle=%.4f'%(key+tuple(v.mean(0))))
if __name__=='__main__':
    pipeline(sys.argv[1], mode=sys.argv[2])
