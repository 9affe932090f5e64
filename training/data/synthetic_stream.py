"""The synthetic training stream every synthetic task dataset extends: an endless, seeded `IterableDataset` whose
workers and epochs draw disjoint random streams."""

import random
from typing import Iterator

import torch


def _worker_rng(seed: int, epoch: int) -> tuple[random.Random, int, int]:
    """A generator per DataLoader worker, so workers never yield the same stream; returns (rng, worker, workers)."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return random.Random(f"efficientvlm-synthetic-{seed}-{epoch}-{worker}"), worker, workers


class _SyntheticIterable(torch.utils.data.IterableDataset):
    """Shared machinery: fresh items per step, deterministic per (seed, epoch, worker)."""

    def __init__(self, image_size: int = 64, seed: int = 0, num_samples: int | None = None,
                 return_scene: bool = False):
        super().__init__()
        self.image_size, self.seed, self.num_samples, self.return_scene = image_size, seed, num_samples, return_scene
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes the stream for the next pass (called by Trainer/accelerate between epochs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{type(self).__name__} is infinite; pass num_samples to give it a length")
        return self.num_samples

    def __iter__(self) -> Iterator[dict]:
        rng, worker, workers = _worker_rng(self.seed, self.epoch)
        # with num_samples, workers split the total; without, each worker streams forever
        count = None if self.num_samples is None else len(range(worker, self.num_samples, workers))
        produced = 0
        while count is None or produced < count:
            for item in self._items(rng):
                if count is not None and produced == count:
                    return
                yield item
                produced += 1

    def _items(self, rng: random.Random) -> list[dict]:
        """The next item(s) of the stream: one by default; a group (several captions of an image, twins) stays
        together so it lands in one batch."""
        return [self._item(rng)]

    def _item(self, rng: random.Random) -> dict:
        raise NotImplementedError
