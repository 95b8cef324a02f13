"""Routing prototype (numpy): recall@100 of the exact top-100 (non-static) among the keys of
the best-scoring clusters, at several scanned fractions, for plain k-means and k-means under the
query metric M = E[qq^T] of the train queries (mode "maha"); "+a" adds a spread term to the
routing score, "iso+a" a radius term. A random 48 evaluation queries per head.

    python3 tools/prototype/routing.py ../shared/data/gemma3-jargon-16k.safetensors plain,maha [list_size]
"""
import json, struct, sys, numpy as np
def load(path):
    with open(path,'rb') as f:
        n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n)); base=8+n
        out={}
        for k,v in h.items():
            if k=='__metadata__': out[k]=v; continue
            f.seek(base+v['data_offsets'][0]); b=f.read(v['data_offsets'][1]-v['data_offsets'][0])
            dt={'F16':np.float16,'I64':np.int64,'F32':np.float32}[v['dtype']]
            out[k]=np.frombuffer(b,dtype=dt).reshape(v['shape'])
    return out
def quant(X, b):
    """Per-channel uniform b-bit quantisation of the rows of X (min to max), decoded."""
    lo=X.min(0); st=(X.max(0)-lo)/(2**b-1); st[st==0]=1
    return np.clip(np.round((X-lo)/st),0,2**b-1)*st+lo
def qclip(X, b, pct):
    """Like quant, over the range between the pct-th and (100-pct)-th percentiles (clipped)."""
    lo=np.percentile(X,pct,axis=0); hi=np.percentile(X,100-pct,axis=0); st=(hi-lo)/(2**b-1); st[st==0]=1
    return np.clip(np.round((X-lo)/st),0,2**b-1)*st+lo
def probe_by(scores, aa, open_, f, vis):
    """Visible, non-static keys (assignment aa of the visible keys, mask open_) of the lists best
    by `scores` until their open members reach a fraction f."""
    sizes=np.bincount(aa[open_],minlength=len(scores)); o=np.argsort(-scores); c=np.cumsum(sizes[o])
    n=np.searchsorted(c,f*vis)+1
    return np.nonzero(np.isin(aa,o[:n])&open_)[0]
def report(acc, path, width=11):
    """Prints, per key of acc (name, probe, ...), the mean recall@100, mass, oracle mass and gap."""
    for key,v in sorted(acc.items()):
        v=np.array(v)
        print(path.split('/')[-1][:12],('%-'+str(width)+'s probe=%.2f')%key[:2],*key[2:],'R@100=%.3f mass=%.4f oracle=%.4f gap=%.4f'%(tuple(v.mean(0))+(v[:,2].mean()-v[:,1].mean(),)))
def load_dump(path):
    """A dump's metadata and arrays as f32: (softmax scales, keys, evaluation queries, train
    queries, query positions, query heads per KV head)."""
    d=load(path); scales=json.loads(d['__metadata__']['softmax_scale'])
    K=d['keys'].astype(np.float32); Qe=d['queries'].astype(np.float32); Qt=d['train_queries'].astype(np.float32)
    return scales, K, Qe, Qt, d['query_positions'], Qe.shape[1]//K.shape[1]
def kmeans(X, k, iters=8, seed=0):
    rng=np.random.default_rng(seed); C=X[rng.choice(len(X),k,replace=False)].copy()
    for _ in range(iters):
        d=(X*X).sum(1)[:,None]-2*X@C.T+(C*C).sum(1)[None]
        a=d.argmin(1)
        for j in range(k):
            m=a==j
            if m.any(): C[j]=X[m].mean(0)
            else: C[j]=X[rng.integers(len(X))]
    return a
def head_clusters(Kh, Qtr, k, metric=True):
    """k-means of one head's keys, under the query metric M = E[qq^T] of its train queries Qtr
    (metric=True) or plain key distance: assignment, raw-key centroids, and M's eigenvalues and
    eigenvectors (None without the metric)."""
    w=V=None
    if metric:
        M=Qtr.T@Qtr/len(Qtr); w,V=np.linalg.eigh(M); w=np.maximum(w,1e-6*w.max())
        X=Kh@(V*np.sqrt(w))
    else: X=Kh
    a=kmeans(X,k)
    C=np.zeros((k,Kh.shape[1])); np.add.at(C,a,Kh); C/=np.maximum(np.bincount(a,minlength=k),1)[:,None]
    return a,C,w,V
class Head:
    """One (layer, KV head) of a dump: its keys `K` (T x D), the train queries of its query
    heads `Qtr` and its softmax `scale`. `clusters` lists its keys under the query metric;
    `queries` draws the evaluation queries a prototype scores (one draw from the shared `rng`
    per head, so that a run repeats)."""
    def __init__(self, dump, l, h, rng, nq):
        scales,K,Qe,Qt,qpos,g=dump
        self.l,self.h,self.g,self.rng,self.nq=l,h,g,rng,nq
        self.K=K[l,h]; self.T,self.D=self.K.shape
        self.Qtr=Qt[l,h*g:(h+1)*g].reshape(-1,self.D); self.scale=scales[l]
        self._Qe,self._qpos=Qe,qpos
    def clusters(self, list_size=32):
        """(lists, assignment, raw-key centroids, M's eigenvalues, eigenvectors): head_clusters."""
        k=self.T//list_size
        return (k,)+head_clusters(self.K,self.Qtr,k,metric=True)
    def queries(self):
        """(query head, query index, query, position) of every query head of the KV head."""
        sel=self.rng.choice(self._Qe.shape[2],self.nq,replace=False)
        for hq in range(self.h*self.g,(self.h+1)*self.g):
            for qi in sel:
                yield hq, qi, self._Qe[self.l,hq,qi], self._qpos[qi]
def dump_heads(path, nq, seed=1):
    """Every (layer, KV head) of a dump as a Head, nq evaluation queries per query head."""
    dump=load_dump(path); rng=np.random.default_rng(seed); L,kvh=dump[1].shape[:2]
    for l in range(L):
        for h in range(kvh):
            yield Head(dump,l,h,rng,nq)
def query_context(Kh, q, p, scale, a, C, k, budget, sink=4, recent=64):
    """One evaluation query at position p: exact scores s, attention probabilities e, the static
    mask, the budget nb, the exact non-static top-100, the oracle's covered mass, the lists best
    centroid first and their cumulative visible sizes."""
    vis=p+1
    s=Kh[:vis]@q; z=scale*s; z-=z.max(); e=np.exp(z); e/=e.sum()
    stat=np.zeros(vis,bool); stat[:sink]=True; stat[max(0,vis-recent):]=True
    nb=int(np.ceil(budget*vis))
    s2=np.where(stat,-np.inf,s); order=np.argsort(-s2); top100=set(order[:100]); ormass=e[stat].sum()+e[order[:nb]].sum()
    ls=C@q; lo_=np.argsort(-ls); sizes=np.bincount(a[:vis],minlength=k); cum=np.cumsum(sizes[lo_])
    return s,e,stat,nb,top100,ormass,lo_,cum
def probed_members(a, lo_, cum, f, vis, stat):
    """Visible, non-static keys of the best lists (order lo_) until they hold a fraction f."""
    n=np.searchsorted(cum,f*vis)+1
    return np.nonzero(np.isin(a[:vis],lo_[:n]) & ~stat)[0]
def rerank(idx, cs, s, e, stat, nb, top100, factor=1.5):
    """Keep the factor*nb best of idx by approximate scores cs, re-rank them by exact scores s and
    attend the best nb: recall@100 and covered mass (static tokens included)."""
    c=idx[np.argsort(-cs)[:int(np.ceil(factor*nb))]]
    best=c[np.argsort(-s[c])[:nb]]
    return len(top100.intersection(best))/100, e[stat].sum()+e[best].sum()
def probe_exactly(acc, routes, fracs, aa, open_, vis, s, e, stat, nb, top100, ormass):
    """For each list score in `routes` (name -> one score per list) and probe fraction in
    `fracs`: probe the lists best first (probe_by), score the probed keys exactly, attend the
    best nb, and append (recall@100, mass, oracle mass) to acc[(name, fraction)]."""
    for name,sc in routes.items():
        for f in fracs:
            idx=probe_by(sc,aa,open_,f,vis)
            rec,mass=rerank(idx,s[idx],s,e,stat,nb,top100,1.0)
            acc.setdefault((name,f),[]).append((rec,mass,ormass))
def evaluate(K, Q, pos, assign, k, route, fracs, sink=4, recent=64):
    # route: function(q, centroids-like stats) -> list scores
    res={f:[] for f in fracs}
    for qi in range(len(Q)):
        q=Q[qi]; p=pos[qi]; vis=p+1
        s=K[:vis]@q
        stat=np.zeros(vis,bool); stat[:sink]=True; stat[max(0,vis-recent):]=True
        s2=np.where(stat,-np.inf,s); top=np.argsort(-s2)[:100]
        ls=route(q)
        order=np.argsort(-ls)
        sizes=np.bincount(assign[:vis],minlength=k)
        cum=np.cumsum(sizes[order])
        intop=np.zeros(k,int); np.add.at(intop,assign[top],1)
        for f in fracs:
            n=np.searchsorted(cum,f*vis)+1
            res[f].append(intop[order[:n]].sum()/100)
    return {f:np.mean(v) for f,v in res.items()}
LS=32
def run(path, nq=48, fracs=(0.03,0.05,0.1,0.2,0.4), modes=('plain','maha')):
    d=load(path); md=d['__metadata__']
    K=d['keys'].astype(np.float32); Qe=d['queries'].astype(np.float32); Qt=d['train_queries'].astype(np.float32)
    qpos=d['query_positions']; L,kvh,T,D=K.shape; qh=Qe.shape[1]; g=qh//kvh
    rng=np.random.default_rng(1)
    for mode in modes:
        tot={f:[] for f in fracs}
        for l in range(L):
            for h in range(kvh):
                Kh=K[l,h]; k=T//LS
                Qtr=Qt[l,h*g:(h+1)*g].reshape(-1,D)
                a,C,_,_=head_clusters(Kh,Qtr,k,metric=not mode.startswith('plain'))
                var=np.zeros((k,D)); np.add.at(var,a,Kh*Kh); var=var/np.maximum(np.bincount(a,minlength=k),1)[:,None]-C*C; var=np.maximum(var,0)
                alpha=float(mode.split('+')[1]) if '+' in mode else 0.0
                rad=np.sqrt(var.sum(1))/np.sqrt(D)
                if 'iso' in mode: route=lambda q: C@q+alpha*np.linalg.norm(q)*rad
                else: route=lambda q: C@q+alpha*np.sqrt(var@(q*q))
                sel=rng.choice(Qe.shape[2],nq,replace=False)
                Qs=Qe[l,h*g:(h+1)*g][:,sel].reshape(-1,D); ps=np.tile(qpos[sel],g)
                r=evaluate(Kh,Qs,ps,a,k,route,fracs)
                for f in fracs: tot[f].append(r[f])
        print(path.split('/')[-1], mode, {f:round(float(np.mean(v)),3) for f,v in tot.items()}, flush=True)
if __name__=='__main__':
    LS=int(sys.argv[3]) if len(sys.argv)>3 else 32
    run(sys.argv[1], modes=sys.argv[2].split(','))
