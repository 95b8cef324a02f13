"""Two-stage code prototype (numpy): a 1- or 2-bit pre-filter before the 4-bit codes.

    python3 tools/prototype/two_stage.py ../shared/data/gemma3-jargon-16k.safetensors
"""
from routing import *
def q_codes(Kh,b):
    lo=Kh.min(0); st=(Kh.max(0)-lo)/(2**b-1); st[st==0]=1
    return np.clip(np.round((Kh-lo)/st),0,2**b-1)*st+lo
def pipeline(path, configs, nq=32, LS=32, budget=0.02):
    d=load(path); md=d['__metadata__']; scales=json.loads(md['softmax_scale'])
    K=d['keys'].astype(np.float32); Qe=d['queries'].astype(np.float32); Qt=d['train_queries'].astype(np.float32)
    qpos=d['query_positions']; L,kvh,T,D=K.shape; qh=Qe.shape[1]; g=qh//kvh
    rng=np.random.default_rng(1); acc={}
    for l in range(L):
        for h in range(kvh):
            Kh=K[l,h]; k=T//LS; Qtr=Qt[l,h*g:(h+1)*g].reshape(-1,D)
            a,C,_,_=head_clusters(Kh,Qtr,k)
            codes={b:q_codes(Kh,b) for b in (1,2,4)}
            sel=rng.choice(Qe.shape[2],nq,replace=False)
            for hq in range(h*g,(h+1)*g):
                for qi in sel:
                    q=Qe[l,hq,qi]; p=qpos[qi]; vis=p+1
                    s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,scales[l],a,C,k,budget)
                    for cfg in configs:
                        f,b1,k1=cfg
                        n=np.searchsorted(cum,f*vis)+1
                        idx=np.nonzero(np.isin(a[:vis],lo_[:n]) & ~stat)[0]
                        if b1:
                            c1=codes[b1][idx]@q; idx=idx[np.argsort(-c1)[:int(k1*vis)]]
                        cs=codes[4][idx]@q
                        c=idx[np.argsort(-cs)[:int(np.ceil(1.5*nb))]]
                        best=c[np.argsort(-s[c])[:nb]]
                        acc.setdefault(cfg,[]).append((len(top100.intersection(best))/100, e[stat].sum()+e[best].sum(), ormass))
    for cfg,v in acc.items():
        v=np.array(v); f,b1,k1=cfg
        cb = f*4/32 if not b1 else f*b1/32 + k1*4/32
        print(path.split('/')[-1][:6],cfg,'code%%=%.2f R@100=%.3f mass=%.4f oracle=%.4f'%((cb*100,)+tuple(v.mean(0))))
pipeline(sys.argv[1], [(0.12,0,0),(0.15,0,0),(0.2,0,0),(0.25,1,0.06),(0.3,1,0.06),(0.3,2,0.06),(0.4,2,0.06),(0.3,1,0.1),(0.4,1,0.08),(0.3,2,0.1)])
