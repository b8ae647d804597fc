"""How the engine core drives its model runners beyond its own process: tensor-parallel ranks
(`tensor_parallel.py`), each other rank a worker process (`worker.py`)."""
