"""Code prototype (numpy): codes of the keys' principal components in the whitened space of the
query metric (q.k = q'.z with z = L^T k, M = E[qq^T] = LL^T), with bits allocated by reverse
water-filling over the components (512, 384 or 256 bits per key, ranges clipped at c sigma or
not) or 4 bits for each of the top 96 or 128 components, against 4-bit codes of the raw keys; recall@100 and covered mass at probes 0.2, 0.3 and 1.
A random N evaluation queries per head (default 24).

    python3 tools/prototype/pca_codes.py ../shared/data/gemma3-jargon-16k.safetensors 16
"""
import sys, json, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, query_context, probed_members, rerank
path=sys.argv[1]; nq=int(sys.argv[2]) if len(sys.argv)>2 else 24
budget=0.02; LS=32
def alloc(ev,total,maxb=8):
    # greedy: each bit to the component with largest current distortion ev*4^-b
    b=np.zeros(len(ev),int); dist=ev.copy()
    for _ in range(total):
        j=np.argmax(dist); b[j]+=1; dist[j]/=4
        if b[j]>=maxb: dist[j]=0
    return b
def quant_b(X,b,clip):
    out=np.zeros_like(X)
    for j in range(X.shape[1]):
        if b[j]==0: continue
        x=X[:,j]
        if clip>0:
            sd=x.std(); lo=max(x.min(),-clip*sd); hi=min(x.max(),clip*sd)
        else: lo,hi=x.min(),x.max()
        n=2**b[j]-1; st=(hi-lo)/n if hi>lo else 1
        out[:,j]=np.clip(np.round((x-lo)/st),0,n)*st+lo
    return out
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    M=Qtr.T@Qtr/len(Qtr); w,V=np.linalg.eigh(M); w=np.maximum(w,1e-6*w.max())
    A=V*np.sqrt(w); B=V/np.sqrt(w)
    Z=Kh@A; mu=Z.mean(0); Zc=Z-mu
    ev,U=np.linalg.eigh(Zc.T@Zc/len(Zc)); ev=ev[::-1].clip(0); U=U[:,::-1]
    P=Zc@U
    approx={'raw4':('raw',quant(Kh,4))}
    for r in (96,128):
        Pr=np.zeros_like(P); Pr[:,:r]=quant(P[:,:r],4)
        approx[f'top{r}x4']=('pca',Pr)
    for bits in (512,384,256):
        for clip in (0,4):
            b=alloc(ev,bits)
            approx[f'wf{bits}c{clip}']=('pca',quant_b(P,b,clip))
    # raw-space bit allocation by query energy: distortion per channel = M_jj*range^2
    k,a,C,_,_=hd.clusters(LS)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,C,k,budget)
        qp=(q@B)@U
        for f in (0.2,0.3,1.0):
          idx=probed_members(a,lo_,cum,f,vis,stat)
          for name,(kind,ap) in approx.items():
            cs = ap[idx]@q if kind=='raw' else ap[idx]@qp
            rec,mass=rerank(idx,cs,s,e,stat,nb,top100)
            acc.setdefault((f,name),[]).append((rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:8],'probe=%.2f %-9s R@100=%.3f mass=%.4f oracle=%.4f'%(key+tuple(v.mean(0))))
