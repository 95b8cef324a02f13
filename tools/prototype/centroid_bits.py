"""Centroid prototype (numpy): recall@100 and covered mass against bytes read for 32- and 16-key
lists with 8- or 4-bit centroid codes (query-metric k-means, 4-bit key codes, 1.5x re-rank), at
several probe fractions. A random N evaluation queries per head (default 24).

    python3 tools/prototype/centroid_bits.py ../shared/data/gemma3-jargon-16k.safetensors 16
"""
import sys, json, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from routing import dump_heads, quant, query_context, probed_members, rerank
path=sys.argv[1]; nq=int(sys.argv[2]) if len(sys.argv)>2 else 24
budget=0.02
acc={}
for hd in dump_heads(path,nq,1):
    l,Kh,Qtr,T,D=hd.l,hd.K,hd.Qtr,hd.T,hd.D
    codes=quant(Kh,4)
    cfgs={}
    for LS in (32,16):
        k,a,C,_,_=hd.clusters(LS)
        for cb in (8,4):
            cfgs[(LS,cb)]=(a,quant(C,cb),k)
    for hq,qi,q,p in hd.queries():
        vis=p+1
        for (LS,cb),(a,C,k) in cfgs.items():
          s,e,stat,nb,top100,ormass,lo_,cum=query_context(Kh,q,p,hd.scale,a,C,k,budget)
          for f in (0.08,0.12,0.16,0.2,0.3):
            idx=probed_members(a,lo_,cum,f,vis,stat)
            rec,mass=rerank(idx,codes[idx]@q,s,e,stat,nb,top100)
            # bytes as fraction of fp16 K+V of visible keys (4*D bytes per token)
            byt=(k*D*cb/8 + len(idx)*D/2 + 1.5*nb*2*D + nb*2*D + 0.0047*vis*4*D)/(vis*4*D)
            acc.setdefault((LS,cb,f),[]).append((byt*100,rec,mass,ormass))
for key,v in sorted(acc.items()):
    v=np.array(v); print(path.split('/')[-1][:8],'list=%d cbits=%d probe=%.2f  bytes=%.2f%% R@100=%.3f mass=%.4f oracle=%.4f'%(key+tuple(v.mean(0))))
