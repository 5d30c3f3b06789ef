/* File -> socket on loopback (docs/FLOWS.md, 2026-12-07): CPU of the sending thread alone (RUSAGE_THREAD), and the
 * process's CPU minus the receiving thread's (what kecho-bench counts), for one way of sending a file:
 *   rw       read/write loop, 64 KiB buffer (the bench's read/write loop)
 *   sfN      sendfile, N MiB per call
 *   spK      splice file -> pipe of K KiB -> socket, SPLICE_F_MOVE | SPLICE_F_MORE
 * The receiver is a thread that reads 256 KiB at a time (the bench's drainer); its CPU is printed, not counted.
 * Build: cc -O2 -o file_to_socket file_to_socket.c -lpthread. Usage: file_to_socket MODE FILE (run the modes
 * alternately, several rounds; the file in the page cache). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/sendfile.h>
#include <sys/resource.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <time.h>
#include <err.h>

static int lfd; static long drained; static double dcpu;
static double tcpu(void){ struct rusage u; getrusage(RUSAGE_THREAD,&u);
  return u.ru_utime.tv_sec+u.ru_utime.tv_usec/1e6+u.ru_stime.tv_sec+u.ru_stime.tv_usec/1e6; }
static double pcpu(void){ struct timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t); return t.tv_sec+t.tv_nsec/1e9; }
static void *drain(void *a){ int s=accept(lfd,0,0); char *b=malloc(256<<10); long n=0; ssize_t k;
  double c0=tcpu(); while((k=read(s,b,256<<10))>0) n+=k; dcpu=tcpu()-c0; drained=n; close(s); return 0; }
int main(int argc,char**argv){
  const char *mode=argv[1]; const char *path=argv[2];
  struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)}; socklen_t al=sizeof a;
  lfd=socket(AF_INET,SOCK_STREAM,0); bind(lfd,(void*)&a,al); listen(lfd,1); getsockname(lfd,(void*)&a,&al);
  pthread_t th; pthread_create(&th,0,drain,0);
  int s=socket(AF_INET,SOCK_STREAM,0); if(connect(s,(void*)&a,al)) err(1,"connect");
  int f=open(path,O_RDONLY); off_t sz=lseek(f,0,SEEK_END); lseek(f,0,SEEK_SET);
  struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
  double p0=pcpu(), c0=tcpu(); long calls=0;
  if(!strcmp(mode,"rw")){ char *b=malloc(64<<10); ssize_t k; while((k=read(f,b,64<<10))>0){ calls+=2; char*p=b; while(k>0){ssize_t w=write(s,p,k); if(w<0)err(1,"w"); p+=w;k-=w;} } }
  else if(!strncmp(mode,"sf",2)){ size_t step=(size_t)atol(mode+2)<<20; ssize_t k; while((k=sendfile(s,f,0,step))>0) calls++; if(k<0)err(1,"sf"); }
  else if(!strncmp(mode,"sp",2)){ int p[2]; pipe(p); int ps=atoi(mode+2)<<10; if(fcntl(p[1],F_SETPIPE_SZ,ps)<0) err(1,"setpipe"); 
    for(;;){ ssize_t k=splice(f,0,p[1],0,ps,SPLICE_F_MOVE|SPLICE_F_MORE); calls++; if(k<0)err(1,"splice in"); if(k==0)break;
      while(k>0){ ssize_t w=splice(p[0],0,s,0,k,SPLICE_F_MOVE|SPLICE_F_MORE); calls++; if(w<=0)err(1,"splice out"); k-=w; } } }
  else errx(1,"mode");
  double c1=tcpu(); shutdown(s,SHUT_WR); close(s); pthread_join(th,0); double p1=pcpu();
  clock_gettime(CLOCK_MONOTONIC,&t1); double wall=(t1.tv_sec-t0.tv_sec)+(t1.tv_nsec-t0.tv_nsec)/1e9;
  double gb=sz/1e9;
  printf("%-6s sender_thread %.3f s/GB  process-minus-drainer %.3f s/GB  drainer %.3f s/GB  %.0f MB/s calls %ld drained %ld\n",
    mode,(c1-c0)/gb,(p1-p0-dcpu)/gb,dcpu/gb,sz/1e6/wall,calls,drained);
  return 0; }
