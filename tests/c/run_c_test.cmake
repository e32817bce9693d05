# CTest test c_api: installs the built project into a scratch prefix, builds tests/c (a C11 program,
# the header as C99 and C++, and the README's C example) against it with find_package(ddim), makes
# the reference outputs with the installed `ddim` tool (a C++ API program), then runs the C program,
# which checks its results bitwise against them.
# -D: SOURCE_DIR BUILD_DIR WORK_DIR CMAKE_GENERATOR MAKE_MODEL (ddim-make-model) MODEL
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/ref ${WORK_DIR}/scratch)
set(prefix ${WORK_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# The README's example: the first ```c block after the heading "## Embedding from C".
file(READ ${SOURCE_DIR}/README.md readme)
string(FIND "${readme}" "\n## Embedding from C" at)
if(at LESS 0)
  message(FATAL_ERROR "README.md has no section '## Embedding from C'")
endif()
string(SUBSTRING "${readme}" ${at} -1 section)
string(FIND "${section}" "\n```c\n" begin)
if(begin LESS 0)
  message(FATAL_ERROR "README.md's section 'Embedding from C' has no ```c example")
endif()
math(EXPR begin "${begin} + 6")
string(SUBSTRING "${section}" ${begin} -1 section)
string(FIND "${section}" "\n```" end)
string(SUBSTRING "${section}" 0 ${end} example)
file(WRITE ${WORK_DIR}/readme_example.c "${example}\n")

run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/c -B ${WORK_DIR}/build -G ${CMAKE_GENERATOR}
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release -DREADME_EXAMPLE=${WORK_DIR}/readme_example.c)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)

# Reference outputs from the installed tool, on the CPU.
set(ddim ${prefix}/bin/ddim)
set(ref ${WORK_DIR}/ref)
run(${MAKE_MODEL} --preset tiny --train-timesteps 20 --seed 3 --out ${WORK_DIR}/t20.ddim)
run(${ddim} sample --model ${MODEL} --device cpu --steps 6 --eta 0.5 --seeds 9,2,5
    --out ${ref}/sample.npy --trajectory ${ref}/trajectory.npy --x0 ${ref}/x0.npy)
run(${ddim} sample --model ${WORK_DIR}/t20.ddim --device cpu --sampler ddpm --seed 4 --batch 2 --out ${ref}/ddpm.npy)
run(${ddim} invert --model ${MODEL} --device cpu --input ${ref}/sample.npy --steps 5
    --out ${ref}/invert.npy --trajectory ${ref}/invert_trajectory.npy)
run(${ddim} forward --model ${MODEL} --device cpu --x ${ref}/sample.npy --t 500 --out ${ref}/forward.npy)

run(${MAKE_MODEL} --preset tiny --class index --num-classes 10 --record-null --seed 5 --out ${WORK_DIR}/cc.ddim)
run(${ddim} sample --model ${WORK_DIR}/cc.ddim --device cpu --threads 1 --steps 4 --seeds 9,2 --class-labels 3,7
    --guidance-scale 2.5 --out ${ref}/cc_sample.npy)
run(${ddim} forward --model ${WORK_DIR}/cc.ddim --device cpu --threads 1 --x ${ref}/cc_sample.npy --t 500 --class-labels 3,7
    --guidance-scale 2.5 --out ${ref}/cc_forward.npy)

run(${MAKE_MODEL} --preset ldm-tiny --seed 6 --out ${WORK_DIR}/ldm.ddim)
run(${ddim} sample --model ${WORK_DIR}/ldm.ddim --device cpu --threads 1 --steps 4 --seeds 9,2 --out ${ref}/latent_sample.npy)

run(${WORK_DIR}/build/ddim_c_api_test ${MODEL} ${WORK_DIR}/t20.ddim ${ref} ${WORK_DIR}/scratch ${WORK_DIR}/cc.ddim
    ${WORK_DIR}/ldm.ddim)
run(${WORK_DIR}/build/readme_example ${MODEL})
