"""Seconds per image of pytorch-fid's FID Inception in PyTorch, to set beside ditrun's
(`cargo test --test eval_inception -- --ignored time_features_per_image`): same network, same
weights (the reference's random ones, or the real file converted to safetensors), same 32x32
inputs resized to 299, same threads. Needs torch, torchvision, pytorch-fid and safetensors.

    python scripts/torch_inception_timing.py ../shared/reference/inception_fid/model.safetensors
"""

import sys
import time

import torch
import pytorch_fid.inception as fid_inception
from safetensors.torch import load_file


def model(weights_path):
    state = load_file(weights_path)
    # fid_inception_v3 downloads pytorch-fid's weights; hand it the local file instead (the
    # classifier `fc.*` is not in it and not used for pool3 features).
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    original = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, sd, strict=True, **kw: original(self, sd, strict=False)
    network = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    torch.nn.Module.load_state_dict = original
    return network.eval()


def main():
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(threads)
    network = model(sys.argv[1])
    torch.manual_seed(0)
    expected_path = sys.argv[1].replace("model.safetensors", "expected.safetensors")
    with torch.no_grad():
        try:
            expected = load_file(expected_path)
        except FileNotFoundError:
            expected = None
        if expected is not None:  # the same network as ditrun's parity test checks
            got = network(expected["images"])[0].flatten(1)
            error = (got - expected["features"]).abs().max() / expected["features"].abs().max()
            print(f"features against {expected_path}: relative error {error:.2e}")
        network(torch.rand(2, 3, 32, 32))  # warm-up
        for batch in (4, 32):
            images = torch.rand(batch, 3, 32, 32)
            start, cpu = time.perf_counter(), time.process_time()
            features = network(images)[0]
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            assert features.shape == (batch, 2048, 1, 1)
            print(f"torch {torch.__version__}, {threads} threads, batch {batch}: "
                  f"{wall / batch:.3f} s per image, {cpu / batch:.3f} CPU s per image")


if __name__ == "__main__":
    main()
