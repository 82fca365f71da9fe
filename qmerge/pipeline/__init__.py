"""From an adapter and its base to the merged model's tensors, one at a time.

source.py pairs the inputs (Source, open_source); base.py reproduces the weights training saw; fit.py
finds what makes a base or an adapter unusable (adapter_fit.py the adapter's side, problem.py the finding);
steps.py decides, once per tensor, how it is made;
fused.py is the row-block dequantize + LoRA + cast; stream.py runs the steps with read-ahead.
"""
