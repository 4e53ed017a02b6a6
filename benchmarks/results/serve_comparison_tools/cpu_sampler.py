import os, sys, time
root=int(sys.argv[1]); dur=float(sys.argv[2])
tck=os.sysconf("SC_CLK_TCK")
def tree():
    kids={}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                s=open(f"/proc/{p}/stat").read(); kids.setdefault(int(s.rsplit(")",1)[1].split()[1]),[]).append(int(p))
            except Exception: pass
    res,st=[],[root]
    while st:
        x=st.pop(); res.append(x); st.extend(kids.get(x,[]))
    return res
def cpu(p):
    try:
        f=open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split(); return (int(f[11])+int(f[12]))/tck, int(f[17])
    except Exception: return None
def allcpu():
    l=open("/proc/stat").readline().split()[1:]; return [int(x)/tck for x in l]
prev={p:cpu(p) for p in tree()}; pa=allcpu(); t0=time.time()
while time.time()-t0<dur:
    time.sleep(5)
    cur={p:cpu(p) for p in tree()}; ca=allcpu()
    d={p:round((cur[p][0]-prev[p][0])/5,2) for p in cur if cur[p] and prev.get(p)}
    tot=[b-a for a,b in zip(pa,ca)]; 
    print(f"{time.time()-t0:6.0f}s proc cpu/s {d}  system: user {tot[0]/5:.2f} nice {tot[1]/5:.2f} sys {tot[2]/5:.2f} idle {tot[3]/5:.2f}", flush=True)
    prev=cur; pa=ca
