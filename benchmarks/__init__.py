"""fastvit's benchmarks: bench_<family>.py per op family; results/ holds committed GPU runs."""
