"""Records to a store: the writer thread, its memory budget, the array layout and the commit
protocol. Takes records (torch tensors staged on the host) and hands numpy to a backend."""
