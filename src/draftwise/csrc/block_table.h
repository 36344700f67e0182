// The block-product kernels by row count (1..8), shared by grid_matmul.cpp and avx512.cpp: tiles per block chosen
// so that rows * tiles stays within the vector registers. Include it inside the file's anonymous namespace, after
// its `BlockFn` and `block_product`. torch rebuilds a kernel when its .cpp changes, not when this header does.
template <bool Nibbles>
constexpr BlockFn kBlocks[9] = {
    nullptr,
    block_product<1, 4, Nibbles>, block_product<2, 4, Nibbles>, block_product<3, 2, Nibbles>,
    block_product<4, 2, Nibbles>, block_product<5, 1, Nibbles>, block_product<6, 1, Nibbles>,
    block_product<7, 1, Nibbles>, block_product<8, 1, Nibbles>,
};
constexpr int kTiles[9] = {0, 4, 4, 2, 2, 1, 1, 1, 1};
