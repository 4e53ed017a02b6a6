"""Sample RSS of a process tree every second until stop file exists; print max sum."""
import os, sys, time, json
root = int(sys.argv[1]); stopfile = sys.argv[2]; out = sys.argv[3]
def tree():
    kids = {}
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            with open(f"/proc/{p}/stat") as f: s = f.read()
            ppid = int(s.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(p))
        except Exception: pass
    res, st = [], [root]
    while st:
        x = st.pop(); res.append(x); st.extend(kids.get(x, []))
    return res
def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for l in f:
                if l.startswith("VmRSS:"): return int(l.split()[1])
    except Exception: pass
    return 0
peak = {"rss_kb": 0}; samples = []
while not os.path.exists(stopfile):
    pids = tree(); rs = {p: rss_kb(p) for p in pids}; tot = sum(rs.values())
    samples.append((time.time(), tot, len([p for p in pids if rs[p] > 0])))
    if tot > peak["rss_kb"]:
        names = {}
        for p in pids:
            try: names[p] = open(f"/proc/{p}/comm").read().strip()
            except Exception: names[p] = "?"
        peak = {"rss_kb": tot, "nproc": len([p for p in pids if rs[p] > 0]), "per_proc": {f"{p}:{names[p]}": rs[p] for p in pids if rs[p] > 0}}
    time.sleep(1)
peak["samples"] = len(samples)
json.dump({"peak": peak, "samples": samples}, open(out, "w"))
print(json.dumps(peak))
