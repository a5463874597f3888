"""Small LeRobot datasets for the tests: v3.0 written in LeRobot's v3 layout."""

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keras_openpi.data.lerobot_writer import infer_features
from keras_openpi.data.video import encode_video

FPS = 10


def write_v3(root, episodes, episodes_per_file=2):
    """LeRobot v3.0: episodes share data files and concatenated videos (per `episodes_per_file`).

    Returns:
        the root.
    """
    root = pathlib.Path(root)
    (root / "meta").mkdir(parents=True)
    features = infer_features(episodes[0], use_videos=True)
    videos = [k for k, f in features.items() if f["dtype"] == "video"]
    tasks = {}
    for episode in episodes:
        tasks.setdefault(episode["task"], len(tasks))
    rows, frame = [], 0
    for file_index in range(0, len(episodes), episodes_per_file):
        group = list(enumerate(episodes))[file_index : file_index + episodes_per_file]
        file_number = file_index // episodes_per_file
        columns = {
            k: []
            for k in [*features, "timestamp", "frame_index", "episode_index", "index", "task_index"]
        }
        offsets = {key: 0 for key in videos}
        for key in videos:
            frames = np.concatenate([episode[key] for _, episode in group])
            path = root / f"videos/{key}/chunk-000/file-{file_number:03d}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            info = encode_video(frames, path, FPS)
            features[key]["info"] = info
        for index, episode in group:
            length = len(episode["action"])
            row = {
                "episode_index": index,
                "tasks": [episode["task"]],
                "length": length,
                "data/chunk_index": 0,
                "data/file_index": file_number,
                "dataset_from_index": frame,
                "dataset_to_index": frame + length,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
            }
            for key in videos:
                row[f"videos/{key}/chunk_index"] = 0
                row[f"videos/{key}/file_index"] = file_number
                row[f"videos/{key}/from_timestamp"] = offsets[key] / FPS
                row[f"videos/{key}/to_timestamp"] = (offsets[key] + length) / FPS
                offsets[key] += length
            rows.append(row)
            for key in features:
                if key not in videos:
                    columns[key].extend(list(episode[key]))
            columns["timestamp"].extend((np.arange(length) / FPS).astype(np.float32))
            columns["frame_index"].extend(range(length))
            columns["episode_index"].extend([index] * length)
            columns["index"].extend(range(frame, frame + length))
            columns["task_index"].extend([tasks[episode["task"]]] * length)
            frame += length
        table = {}
        for key, values in columns.items():
            if key in videos:
                continue
            if key in features:
                dtype = pa.from_numpy_dtype(np.dtype(features[key]["dtype"]))
                table[key] = pa.array([np.asarray(v).tolist() for v in values], pa.list_(dtype))
            else:
                table[key] = pa.array(np.asarray(values))
        table = pa.table(table)
        path = root / f"data/chunk-000/file-{file_number:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    episodes_path = root / "meta/episodes/chunk-000/file-000.parquet"
    episodes_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path)
    pq.write_table(
        pa.table({"task_index": list(tasks.values()), "task": list(tasks)}),
        root / "meta/tasks.parquet",
    )
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[key] = {
            "dtype": "float32" if key == "timestamp" else "int64",
            "shape": [1],
            "names": None,
        }
    info = {
        "codebase_version": "v3.0",
        "robot_type": None,
        "total_episodes": len(episodes),
        "total_frames": frame,
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": FPS,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features,
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    (root / "meta/stats.json").write_text(json.dumps({}))
    return root
