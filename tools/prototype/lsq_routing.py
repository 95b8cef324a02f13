"""Least-squares routing vectors prototype (numpy): per list, a vector r = c + u fitted by ridge
regression over the train queries so that q·r predicts a per-list target from what the centroid
score q·c misses. Lists ranked by q·r (4-bit codes unless said, as many bytes as the centroids)
on the evaluation queries, probed keys scored exactly. A random N evaluation queries per head.

Variants (the seventh session built `lme`: `index/src/routing.rs`):
- max: the list's best member score;
- lme: ln(mean_k exp(s·q·k)) / s, s the softmax scale (lme2, lme.5: at twice, half the scale);
- +b: with a per-list intercept (an extra unpenalised query feature fixed at 1);
- rankR: u restricted to the top R eigenvectors of the train queries' second moment;
- -Bb: routing vectors as B-bit codes;
- -1k: fitted to 1,024 of the head's train queries.

    python3 tools/prototype/lsq_routing.py out/dumps/gemma3-devil-16k.safetensors 16
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, query_context, probe_exactly, report
path=sys.argv[1]; nq=int(sys.argv[2])
budget=0.02
acc={}
for hd in dump_heads(path,nq,7):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    k,a,C,w,V=hd.clusters()
    Cq=quant(C,4)
    S=Qtr@Kh.T  # [n_train, T]
    order=np.argsort(a,kind='stable'); bounds=np.searchsorted(a[order],np.arange(k+1))
    Ss=S[:,order]
    def target(temp):
        """Per train query and list: best member score (temp None) or log-mean-exp at temp·s."""
        M=np.zeros((len(Qtr),k))
        for j in range(k):
            seg=Ss[:,bounds[j]:bounds[j+1]]
            if seg.shape[1]==0: continue
            if temp is None: M[:,j]=seg.max(1); continue
            z=temp*hd.scale*seg; mz=z.max(1,keepdims=True)
            M[:,j]=(mz[:,0]+np.log(np.exp(z-mz).mean(1)))/(temp*hd.scale)
        return M
    base=Qtr@C.T
    G=Qtr.T@Qtr; lam=1e-3*np.trace(G)/D
    ridge=lambda Q,G_: np.linalg.solve(G_+lam*np.eye(len(G_)),Q.T)
    A=ridge(Qtr,G)
    Qa=np.hstack([Qtr,np.ones((len(Qtr),1))]); Ra=np.eye(D+1)*lam; Ra[D,D]=1e-6
    Aa=np.linalg.solve(Qa.T@Qa+Ra,Qa.T)
    ev,EV=np.linalg.eigh(G)
    sel=np.random.default_rng(0).choice(len(Qtr),min(1024,len(Qtr)),replace=False)
    routes={}  # name -> (vectors, per-list bias)
    targets={'max':target(None),'lme':target(1.0),'lme2':target(2.0),'lme.5':target(0.5)}
    for name,M in targets.items():
        routes[name]=(quant(C+(A@(M-base)).T,4),0)
        W=(Aa@(M-base)).T; routes[name+'+b']=(quant(C+W[:,:D],4),W[:,D])
    M=targets['lme']; U=(A@(M-base)).T
    for b in (2,3): routes['lme-%db'%b]=(quant(C+U,b),0)
    for r in (16,32,64):
        P=EV[:,-r:]; Z=Qtr@P
        routes['lme-rank%d'%r]=(quant(C+(P@np.linalg.solve(Z.T@Z+lam*np.eye(r),Z.T@(M-base))).T,4),0)
    Qs=Qtr[sel]; routes['lme-1k']=(quant(C+(ridge(Qs,Qs.T@Qs)@(M[sel]-base[sel])).T,4),0)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,Cq,k,budget)
        open_=~stat; aa=a[:vis]
        scores={'centroid':Cq@q}
        for name,(R,bias) in routes.items(): scores[name]=R@q+bias
        probe_exactly(acc,scores,(0.1,0.2,0.25),aa,open_,vis,s,e,stat,nb,top100,ormass)
report(acc,path,12)
