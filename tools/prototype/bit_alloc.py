"""Query-aware bit allocation prototype (numpy): rotate keys into the eigenbasis of
M = E[qq^T] of the train queries, give each rotated dimension bits by reverse water-filling on
w_i * range_i^2 (1, 1.5 or 2 bits per dimension on average), score with the rotated query;
recall@100, covered mass and bytes read against the 4-bit per-channel codes. 24 random
evaluation queries per head.

    python3 tools/prototype/bit_alloc.py ../shared/data/gemma3-jargon-16k.safetensors 0
"""
from routing import *
def alloc_bits(w, rng_, total, cap=8):
    b=np.zeros(len(w),int); err=w*rng_**2
    for _ in range(int(total)):
        i=np.argmax(err*4.0**(-b)*(b<cap)); b[i]+=1
    return b
def quant(Y, b):
    lo=Y.min(0); hi=Y.max(0); out=np.empty_like(Y)
    for i in range(Y.shape[1]):
        if b[i]==0: out[:,i]=Y[:,i].mean(); continue
        st=(hi[i]-lo[i])/(2**b[i]-1) or 1.0
        out[:,i]=np.clip(np.round((Y[:,i]-lo[i])/st),0,2**b[i]-1)*st+lo[i]
    return out
def run(path, fs=(0.15,0.2,0.3), rs=(1.5,2.0), bitsavg=(1.0,1.5,2.0), nq=24, LS=32, budget=0.02, layers=None):
    d=load(path); md=d['__metadata__']; scales=json.loads(md['softmax_scale'])
    K=d['keys'].astype(np.float32); Qe=d['queries'].astype(np.float32); Qt=d['train_queries'].astype(np.float32)
    qpos=d['query_positions']; L,kvh,T,D=K.shape; qh=Qe.shape[1]; g=qh//kvh
    rng=np.random.default_rng(1); acc={}
    for l in (layers or range(L)):
        for h in range(kvh):
            Kh=K[l,h]; k=T//LS
            Qtr=Qt[l,h*g:(h+1)*g].reshape(-1,D)
            a,C,w,V=head_clusters(Kh,Qtr,k)
            lo=Kh.min(0); st=(Kh.max(0)-lo)/15; st[st==0]=1
            approx={'sq4':(np.clip(np.round((Kh-lo)/st),0,15)*st+lo, None)}
            Y=Kh@V; r_=Y.max(0)-Y.min(0)
            for B in bitsavg:
                b=alloc_bits(w, r_, B*D)
                approx['rot%.1f'%B]=(quant(Y,b), V)
            sel=rng.choice(Qe.shape[2],nq,replace=False)
            for hq in range(h*g,(h+1)*g):
                for qi in sel:
                    q=Qe[l,hq,qi]; p=qpos[qi]; vis=p+1
                    s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,scales[l],a,C,k,budget)
                    for f in fs:
                        n=np.searchsorted(cum,f*vis)+1
                        probed=np.isin(a[:vis],lo_[:n]) & ~stat
                        idx=np.nonzero(probed)[0]
                        for name,(A,Vr) in approx.items():
                            qq=q if Vr is None else Vr.T@q
                            cs=A[idx]@qq
                            for r in rs:
                                c=idx[np.argsort(-cs)[:int(np.ceil(r*nb))]]
                                best=c[np.argsort(-s[c])[:nb]]
                                rec=len(top100.intersection(best))/100
                                mass=e[stat].sum()+e[best].sum()
                                bits=4.0 if name=='sq4' else float(name[3:])
                                # bytes as a fraction of visible K+V (fp16): codes of probed keys, full keys of candidates, values of attended
                                by=(len(idx)*bits/32 + len(c)*0.5 + len(best)*0.5)/vis
                                acc.setdefault((f,name,r),[]).append((rec,mass,ormass,by))
    for key,v in sorted(acc.items()):
        v=np.array(v); print(path.split('/')[-1][:6],'probe=%.2f %-7s rr=%.1f  R@100=%.3f mass=%.4f oracle=%.4f bytes(no centroids)=%.2f%%'%(key+tuple(v.mean(0)[:3])+(100*v.mean(0)[3],)))
if __name__=='__main__':
    run(sys.argv[1], layers=[int(x) for x in sys.argv[2].split(',')] if len(sys.argv)>2 else None)
