"""Reads a TensorBoard run with the real `tensorboard` package and prints what it found as JSON.

Used by tests/tensorboard.rs to check ditrun's event files the way TensorBoard itself loads
them. Usage:
  python tensorboard_read.py <run dir or event file>      what EventAccumulator reads
  python tensorboard_read.py --hparams-tab <log dir>      what the HPARAMS tab would list
"""

import json
import struct
import sys

from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def png_size(encoded):
    """(width, height) from the PNG's IHDR chunk, to compare with the Summary.Image fields."""
    if encoded[:8] != b"\x89PNG\r\n\x1a\n" or encoded[12:16] != b"IHDR":
        return None
    return list(struct.unpack(">II", encoded[16:24]))


def read(path):
    # 0 keeps every event instead of a reservoir sample.
    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    accumulator = event_accumulator.EventAccumulator(path, size_guidance=guidance)
    accumulator.Reload()
    tags = accumulator.Tags()

    scalars = {
        tag: [[event.step, event.value] for event in accumulator.Scalars(tag)]
        for tag in tags["scalars"]
    }
    images = {
        tag: [
            {
                "step": event.step,
                "width": event.width,
                "height": event.height,
                "png_size": png_size(event.encoded_image_string),
            }
            for event in accumulator.Images(tag)
        ]
        for tag in tags["images"]
    }
    texts = {}
    tensors = {}
    for tag in tags["tensors"]:
        plugin = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
        events = accumulator.Tensors(tag)
        if plugin == "text":
            texts[tag] = [
                [event.step, [s.decode("utf-8") for s in event.tensor_proto.string_val]]
                for event in events
            ]
        else:
            tensors[tag] = {"plugin": plugin, "steps": [event.step for event in events]}
    try:
        hparams_content = accumulator.PluginTagToContent("hparams")
    except KeyError:  # the run has no hparams
        hparams_content = {}
    hparams = {
        tag: json_format.MessageToDict(
            plugin_data_pb2.HParamsPluginData.FromString(content),
            preserving_proto_field_name=True,
        )
        for tag, content in hparams_content.items()
    }
    descriptions = {}
    for tag in tags["images"]:
        metadata = accumulator.summary_metadata.get(tag)
        if metadata is not None and metadata.summary_description:
            descriptions[tag] = metadata.summary_description
    return {
        "file_version": accumulator.file_version,
        "scalars": scalars,
        "images": images,
        "texts": texts,
        "tensors": tensors,
        "hparams": hparams,
        "image_descriptions": descriptions,
    }


def hparams_tab(log_dir):
    """The experiment and session groups that TensorBoard's hparams plugin serves for
    `log_dir`, computed by the plugin's own request handlers."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import backend_context
    from tensorboard.plugins.hparams import get_experiment
    from tensorboard.plugins.hparams import list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(log_dir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, log_dir)
    tb_context = base_plugin.TBContext(
        logdir=log_dir, multiplexer=multiplexer, data_provider=provider
    )
    hparams_context = backend_context.Context(tb_context)
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(
        request_context, hparams_context, "", api_pb2.GetExperimentRequest()
    ).run()
    groups = list_session_groups.Handler(
        request_context,
        hparams_context,
        "",
        # The UI asks for every status; a session without end info is UNKNOWN.
        api_pb2.ListSessionGroupsRequest(
            start_index=0,
            slice_size=100,
            allowed_statuses=api_pb2.Status.values(),
        ),
    ).run()
    return {
        "experiment": json_format.MessageToDict(
            experiment, preserving_proto_field_name=True
        ),
        "session_groups": json_format.MessageToDict(
            groups, preserving_proto_field_name=True
        ),
    }


if __name__ == "__main__":
    if sys.argv[1] == "--hparams-tab":
        result = hparams_tab(sys.argv[2])
    else:
        result = read(sys.argv[1])
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
