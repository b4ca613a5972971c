"""Workers count words from a queue: the README's porting example (see tests/test_port.py)."""

# mypy: ignore-errors
# (Written as a user would write it: untyped. Only the parts that differ are in the README.)

import json
import multiprocessing

import kvclient

LINES = ["the quick brown fox", "jumps over the lazy dog", "the end"] * 20


def worker(jobs, counts, lengths, lock, total, status):
    while (line := jobs.get()) is not None:
        for word in line.split():
            with lock:
                counts[word] = counts.get(word, 0) + 1
                total.value += 1
        lengths.append(len(line))
        jobs.task_done()
    jobs.task_done()


def main():
    with kvclient.connect() as kv:
        jobs = kv.queue("jobs")
        counts = kv.dict("counts")
        lengths = kv.list("lengths")
        lock = kv.lock("counts-lock")
        total = kv.value("total", "i", 0)
        status = kv.namespace("status", initial={"state": "counting"})
        args = (jobs, counts, lengths, lock, total, status)
        procs = [multiprocessing.Process(target=worker, args=args) for _ in range(3)]
        for p in procs:
            p.start()
        for line in LINES:
            jobs.put(line)
        jobs.join()  # every line counted
        status.state = "done"
        for _ in procs:
            jobs.put(None)
        for p in procs:
            p.join()
        return {
            "counts": dict(sorted(counts.items())),
            "total": total.value,
            "lengths": sorted(lengths),
            "state": status.state,
        }


if __name__ == "__main__":
    print(json.dumps(main()))
